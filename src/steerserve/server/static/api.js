// Talking to the server: the API key, JSON calls with OpenAI-shaped errors, and chat streams
// read as Server-Sent Events from fetch (EventSource cannot POST or send headers).

const KEYS = { api: "steerserve.apiKey", admin: "steerserve.adminKey" };

// `kind`: "api", or "admin" for a server started with its own --admin-key.
export function storedKey(kind = "api") {
  return localStorage.getItem(KEYS[kind]) || "";
}

export function storeKey(key, kind = "api") {
  if (key) localStorage.setItem(KEYS[kind], key);
  else localStorage.removeItem(KEYS[kind]);
}

// An error the server answered with: its message, HTTP status and the field it concerns.
export class ApiError extends Error {
  constructor(message, status = 0, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

function headers(json, admin = false) {
  const found = {};
  const key = (admin && storedKey("admin")) || storedKey();
  if (key) found.Authorization = `Bearer ${key}`;
  if (json) found["Content-Type"] = "application/json";
  return found;
}

// The server's own message when it sent one ({"error": {"message": ...}}), else the status.
async function errorOf(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && error.message) return new ApiError(error.message, response.status, error.param);
  } catch {
    // not JSON: fall through to the status line
  }
  return new ApiError(`HTTP ${response.status} ${text.slice(0, 200)}`, response.status);
}

async function send(path, options) {
  try {
    return await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`cannot reach the server (${error.message})`);
  }
}

// GET (no body) or POST/DELETE a JSON body; returns the parsed answer or throws ApiError.
// `admin`: an admin route, which takes the admin key when one was given.
export async function api(path, { method = "GET", body = undefined, admin = false } = {}) {
  const json = body !== undefined;
  const response = await send(path, {
    method, headers: headers(json, admin), body: json ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) throw await errorOf(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// The `data:` payloads of an SSE body, one string per event (comments such as pings skipped).
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();  // an incomplete last line waits for the next read
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
  if (data.length) yield data.join("\n");
}

// Streams a chat completion: `onChunk(choice, chunk)` per chunk; resolves with the usage
// block (when the server sent one). An error event in the stream throws like an HTTP error.
export async function streamChat(body, signal, onChunk) {
  const response = await send("/v1/chat/completions", {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  let usage = null;
  for await (const data of sseEvents(response.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.message, 500);
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) onChunk(choice, chunk);
  }
  return usage;
}
