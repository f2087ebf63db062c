// The status panel: hosted models, adapters (load/unload where the server allows it),
// steering vectors, and the queue and throughput read from /metrics.

import { api } from "./api.js";
import { el } from "./forms.js";

// Prometheus text -> {name: total over its label sets}; `_created` samples are skipped.
export function parseMetrics(text) {
  const totals = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match || match[1].endsWith("_created")) continue;
    const [, name, labels, value] = match;
    totals[name] = (totals[name] || 0) + Number(value);
    if (name === "steerserve_http_requests_total" && /status="[45]/.test(labels || "")) {
      totals.http_errors = (totals.http_errors || 0) + Number(value);
    }
  }
  return totals;
}

function row(label, value) {
  return el("tr", {}, el("th", { text: label }), el("td", { text: value }));
}

export class StatusPanel {
  constructor(root, { onError, onChange }) {
    this.root = root;
    this.onError = onError;  // (message) for failed admin actions
    this.onChange = onChange;  // after an adapter or vector was added or removed
    this.last = null;  // {time, tokens}: the previous scrape, for the throughput
  }

  render({ config, models, vectors }) {
    const hosted = models.filter((m) => !m.parent);
    const adapters = models.filter((m) => m.parent);
    this.root.querySelector("#status-models").replaceChildren(...hosted.map((m) => el("li", {},
      el("b", { text: m.id }), ` · ${config.models[m.id]?.num_layers ?? "?"} layers · context `
      + `${m.max_model_len}`)));
    this.renderAdapters(config, adapters);
    this.renderVectors(config, vectors);
  }

  renderAdapters(config, adapters) {
    const list = adapters.map((a) => el("li", {}, el("b", { text: a.id }),
      ` on ${a.parent} `, config.runtime_lora ? el("button", {
        type: "button", class: "small", text: "unload",
        onclick: () => this.admin("/v1/unload_lora_adapter", { lora_name: a.id }),
      }) : null));
    if (!list.length) list.push(el("li", { class: "muted", text: "none" }));
    this.root.querySelector("#status-adapters").replaceChildren(...list);
    this.root.querySelector("#adapter-load").hidden = !config.runtime_lora;
    this.root.querySelector("#adapter-note").hidden = config.runtime_lora;
  }

  renderVectors(config, vectors) {
    const list = vectors.map((v) => el("li", {}, el("b", { text: v.id }),
      ` ${v.target} · ${v.model || "any model"} · layers ${v.layers.join(",")} `,
      config.runtime_vectors ? el("button", {
        type: "button", class: "small", text: "delete",
        onclick: () => this.admin(`/v1/steering/vectors/${encodeURIComponent(v.id)}`,
          undefined, "DELETE"),
      }) : null));
    if (!list.length) list.push(el("li", { class: "muted", text: "none" }));
    this.root.querySelector("#status-vectors").replaceChildren(...list);
  }

  async admin(path, body, method = "POST") {
    try {
      await api(path, { method, body, admin: true });
      await this.onChange();
    } catch (error) {
      this.onError(error.message);
    }
  }

  async loadAdapter(name, path) {
    await this.admin("/v1/load_lora_adapter", { lora_name: name, lora_path: path });
  }

  // /metrics needs no key; a failed scrape only greys the numbers.
  async scrape() {
    const table = this.root.querySelector("#status-metrics");
    let totals;
    try {
      totals = parseMetrics(await api("/metrics"));
    } catch {
      table.classList.add("stale");
      return;
    }
    table.classList.remove("stale");
    const now = performance.now();
    const tokens = totals.steerserve_generation_tokens_total || 0;
    const rate = this.last ? (tokens - this.last.tokens) / ((now - this.last.time) / 1000) : 0;
    this.last = { time: now, tokens };
    const ttftCount = totals.steerserve_time_to_first_token_seconds_count || 0;
    const ttft = ttftCount ? totals.steerserve_time_to_first_token_seconds_sum / ttftCount : 0;
    table.replaceChildren(
      row("waiting", String(totals.steerserve_requests_waiting ?? "?")),
      row("running", String(totals.steerserve_requests_running ?? "?")),
      row("throughput", `${rate.toFixed(1)} tok/s`),
      row("generated", `${tokens} tokens`),
      row("mean TTFT", `${(ttft * 1000).toFixed(0)} ms`),
      row("HTTP", `${totals.steerserve_http_requests_total || 0} requests, `
        + `${totals.http_errors || 0} errors`),
    );
  }
}
