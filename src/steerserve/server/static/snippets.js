// The current request as a curl command and as openai-client Python code. The key is never
// copied into them: both read $STEERSERVE_API_KEY.

// Fields the openai client takes as keyword arguments; everything else goes in extra_body.
const OPENAI_FIELDS = new Set(["model", "messages", "max_tokens", "max_completion_tokens",
  "temperature", "top_p", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "n",
  "stop", "presence_penalty", "frequency_penalty", "logit_bias"]);

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

export function curl(origin, body) {
  return [
    `curl -N ${origin}/v1/chat/completions \\`,
    "  -H 'Content-Type: application/json' \\",
    '  -H "Authorization: Bearer $STEERSERVE_API_KEY" \\',
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

// A JSON value as a Python literal (True/False/None), indented like json.dumps(indent=4).
function python(value, indent = "") {
  const inner = `${indent}    `;
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + python(v, inner)).join(",\n")},\n${indent}]`;
  }
  if (typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return "{}";
    const lines = entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)}`);
    return `{\n${lines.join(",\n")},\n${indent}}`;
  }
  return JSON.stringify(value);
}

export function openaiPython(origin, body) {
  const args = [];
  const extra = {};
  for (const [name, value] of Object.entries(body)) {
    if (OPENAI_FIELDS.has(name)) args.push(`    ${name}=${python(value, "    ")},`);
    else extra[name] = value;
  }
  if (Object.keys(extra).length) args.push(`    extra_body=${python(extra, "    ")},`);
  const read = body.stream
    ? ["for chunk in reply:",
      "    if chunk.choices:",
      '        print(chunk.choices[0].delta.content or "", end="", flush=True)']
    : ["print(reply.choices[0].message.content)"];
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${origin}/v1",`,
    '                api_key=os.environ.get("STEERSERVE_API_KEY", "unused"))',
    "reply = client.chat.completions.create(",
    ...args,
    ")",
    ...read,
  ].join("\n");
}
