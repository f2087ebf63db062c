// The playground: loads what the server offers, runs chats (one column, or two side by side
// without and with the settings, streamed in parallel), and keeps the code panel and the
// status panel current.

import { api, storedKey, storeKey, streamChat } from "./api.js";
import { el } from "./forms.js";
import { Settings } from "./settings.js";
import { curl, openaiPython } from "./snippets.js";
import { StatusPanel } from "./status.js";
import { AnswerView, colour } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const METRICS_EVERY_MS = 3000;

const state = {
  conversations: [],  // one per column: {withSettings, messages, list}
  controllers: [],  // the streams in flight (Stop aborts them)
  tab: "curl",
};
const settings = new Settings(() => updateCode());
const status = new StatusPanel($("status"), { onError: showError, onChange: refresh });

// --- errors and connection --------------------------------------------------------------

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

function setConnection(text, ok) {
  $("connection").textContent = text;
  $("connection").className = `pill ${ok ? "ok" : "bad"}`;
}

// --- loading what the server offers --------------------------------------------------------

async function load() {
  try {
    const [config, openapi] = await Promise.all([api("/playground/config"),
      api("/openapi.json")]);
    settings.setup(config, openapi);
    $("admin-key-field").hidden = !config.admin_key;
    await refresh();
    setConnection(`connected · ${config.default_model}`, true);
    clearError();
  } catch (error) {
    setConnection(error.status === 401 ? "API key needed" : "not connected", false);
    showError(error.message);
    if (error.status === 401) $("api-key").focus();
  }
}

// Models, adapters and vectors change at run time (admin routes): read them again.
async function refresh(chooseVector = null) {
  try {
    const [models, vectors] = await Promise.all([api("/v1/models"),
      api("/v1/steering/vectors")]);
    settings.setModels(models.data);
    settings.setVectors(vectors.data, chooseVector);
    status.render({ config: settings.config, models: models.data, vectors: vectors.data });
    updateCode();
  } catch (error) {
    showError(error.message);
  }
}

// --- requests -------------------------------------------------------------------------------

function messagesFor(history, text) {
  const system = $("system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...history,
    { role: "user", content: text }];
}

// One chat request; `withSettings` adds the steering, decoding and adaptive temperature.
function requestBody(withSettings, history, text) {
  const body = { model: settings.model(), messages: messagesFor(history, text),
    ...settings.sampling(), stream: true, stream_options: { include_usage: true } };
  if ($("overlay").value !== "off") {
    body.logprobs = true;
    body.return_temperatures = true;
  }
  if (withSettings) {
    Object.assign(body, settings.extensions());
    // A learned head picks the temperature; the server refuses one in the request.
    if (body.adaptive_temperature && body.adaptive_temperature.method === "learned") {
      delete body.temperature;
    }
  }
  return JSON.parse(JSON.stringify(body));  // drops the fields left undefined
}

// --- the chat columns ------------------------------------------------------------------------

function renderColumns() {
  const columns = $("compare").checked
    ? [["plain", "without steering / decoding", false], ["steered", "with the settings", true]]
    : [["main", "chat", true]];
  state.conversations = columns.map(([role, title, withSettings]) => {
    const list = el("div", { class: "messages" });
    const node = el("div", { class: "column", "data-role": role },
      el("h3", { text: title }), list);
    return { role, withSettings, messages: [], list, node };
  });
  $("columns").replaceChildren(...state.conversations.map((c) => c.node));
  $("columns").classList.toggle("two", state.conversations.length === 2);
  updateCode();
}

function addMessage(conversation, role, text) {
  const content = el("div", { class: "content", text });
  const message = el("div", { class: `message ${role}` }, content);
  conversation.list.append(message);
  conversation.list.scrollTop = conversation.list.scrollHeight;
  return message;
}

function summary(view, usage, seconds, finish) {
  const tokens = usage ? usage.completion_tokens : view.tokens;
  const rate = seconds > 0 ? ` · ${(tokens / seconds).toFixed(1)} tok/s` : "";
  return `${tokens} tokens · ${seconds.toFixed(2)} s${rate}${finish ? ` · ${finish}` : ""}`;
}

async function ask(conversation, text) {
  const body = requestBody(conversation.withSettings, conversation.messages, text);
  addMessage(conversation, "user", text);
  const message = addMessage(conversation, "assistant", "");
  message.dataset.state = "streaming";
  const view = new AnswerView(message.querySelector(".content"), $("overlay").value);
  const controller = new AbortController();
  state.controllers.push(controller);
  const started = performance.now();
  let finish = null;
  try {
    const usage = await streamChat(body, controller.signal, (choice) => {
      view.append(choice);
      finish = choice.finish_reason || finish;
      conversation.list.scrollTop = conversation.list.scrollHeight;
    });
    // Only a complete exchange joins the history the next turn sends.
    conversation.messages.push({ role: "user", content: text },
      { role: "assistant", content: view.content.textContent });
    message.dataset.state = "done";
    const seconds = (performance.now() - started) / 1000;
    message.append(el("div", { class: "meta", text: summary(view, usage, seconds, finish) }));
  } catch (error) {
    const stopped = error.name === "AbortError";
    message.dataset.state = stopped ? "stopped" : "error";
    message.append(el("div", { class: stopped ? "meta" : "meta failure",
      text: stopped ? "stopped" : error.message }));
    if (!stopped) showError(error.message);
  }
}

async function send(event) {
  if (event) event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controllers.length) return;
  clearError();
  $("prompt").value = "";
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    await Promise.all(state.conversations.map((c) => ask(c, text)));  // in parallel
  } finally {
    state.controllers = [];
    $("send").disabled = false;
    $("stop").disabled = true;
    updateCode();
    status.scrape();
  }
}

// --- extraction, overlay, code panel ----------------------------------------------------------

async function extract() {
  const body = settings.extractionBody();
  $("extract-status").textContent = "extracting…";
  $("extract-button").disabled = true;
  try {
    const card = await api("/v1/steering/vectors", { method: "POST", body, admin: true });
    $("extract-status").textContent = `'${card.id}': layers ${card.layers.join(", ")}`;
    await refresh(card.id);
    $("steer-on").checked = true;
    updateCode();
  } catch (error) {
    $("extract-status").textContent = "failed";
    showError(error.message);
  } finally {
    $("extract-button").disabled = false;
  }
}

function overlayChanged() {
  const mode = $("overlay").value;
  for (const span of document.querySelectorAll(".tok")) colour(span, mode);
  $("legend").hidden = mode === "off";
  $("legend").className = `legend ${mode}`;
  $("legend").textContent = mode === "probability"
    ? "token probability: 0 (red) … 1 (green); hover a token for its numbers"
    : "token temperature: 0 (blue) … 1.5 and over (red); hover a token for its numbers";
  updateCode();
}

function updateCode() {
  const last = state.conversations.at(-1);
  if (!last || !settings.config) return;
  const text = $("prompt").value.trim() || "Hello!";
  const body = requestBody(true, last.messages, text);
  const origin = window.location.origin;
  $("code").textContent = state.tab === "curl" ? curl(origin, body) : openaiPython(origin, body);
}

// --- wiring -------------------------------------------------------------------------------------

function useKeys(event) {
  event.preventDefault();
  storeKey($("api-key").value.trim());
  storeKey($("admin-key").value.trim(), "admin");
  load();
}

function wire() {
  $("api-key").value = storedKey();
  $("admin-key").value = storedKey("admin");
  $("key-form").addEventListener("submit", useKeys);
  $("error-close").addEventListener("click", clearError);
  $("prompt-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("prompt").addEventListener("input", updateCode);
  $("stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
  $("compare").addEventListener("change", renderColumns);
  $("clear").addEventListener("click", renderColumns);
  $("overlay").addEventListener("change", overlayChanged);
  $("extract-button").addEventListener("click", extract);
  $("refresh").addEventListener("click", () => refresh());
  $("adapter-load").addEventListener("submit", (e) => {
    e.preventDefault();
    status.loadAdapter($("adapter-name").value.trim(), $("adapter-path").value.trim());
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      state.tab = tab.dataset.tab;
      document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
      updateCode();
    });
  }
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("code").textContent)
    .catch(() => showError("the browser refused the clipboard; select the text instead")));
}

wire();
renderColumns();
status.scrape();
setInterval(() => { if (!document.hidden) status.scrape(); }, METRICS_EVERY_MS);
load();
