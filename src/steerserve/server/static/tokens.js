// An answer as it streams in: plain text, or one span per generated token carrying its
// probability (and temperature, when the server reports it) for the coloured overlay.

import { el } from "./forms.js";

// Red (improbable) to green (near certain); for temperatures, blue (cold) to red (hot).
export function colour(span, mode) {
  const p = Number(span.dataset.p);
  const t = Number(span.dataset.t);
  if (mode === "probability" && span.dataset.p !== undefined) {
    span.style.backgroundColor = `hsl(${Math.round(120 * p)} 75% 80%)`;
  } else if (mode === "temperature" && span.dataset.t !== undefined) {
    const hot = Math.min(t / 1.5, 1);
    span.style.backgroundColor = `hsl(${Math.round(220 - 220 * hot)} 75% 82%)`;
  } else {
    span.style.backgroundColor = "";
  }
}

function describe(tokens) {
  return tokens.map(({ token, logprob, temperature }) => {
    const parts = [`${JSON.stringify(token)}  p = ${Math.exp(logprob).toFixed(3)}`,
      `logprob ${logprob.toFixed(3)}`];
    if (temperature !== undefined) parts.push(`T = ${temperature.toFixed(2)}`);
    return parts.join(" · ");
  }).join("\n");
}

export class AnswerView {
  constructor(content, overlay) {
    this.content = content;
    this.overlay = overlay;  // "off" | "probability" | "temperature"
    this.pending = [];  // tokens whose text has not arrived yet (a split UTF-8 character)
    this.chunks = 0;
    this.tokens = 0;
  }

  // One streamed choice: its delta text, and the logprobs/temperatures of its tokens.
  append(choice) {
    this.chunks += 1;
    this.content.parentElement.dataset.chunks = String(this.chunks);
    const text = (choice.delta && choice.delta.content) || "";
    const records = (choice.logprobs && choice.logprobs.content) || [];
    const temperatures = choice.temperatures || [];
    records.forEach((record, i) => this.pending.push({
      token: record.token, logprob: record.logprob, temperature: temperatures[i],
    }));
    this.tokens += records.length || (text ? 1 : 0);
    for (const call of (choice.delta && choice.delta.tool_calls) || []) this.toolCall(call);
    if (!text) return;
    if (!this.pending.length) {
      this.content.append(text);
    } else {
      this.spans(text, this.pending);
      this.pending = [];
    }
  }

  // A tool call arrives whole (its name and JSON arguments), shown as a line of its own.
  toolCall(call) {
    const { name, arguments: args } = call.function;
    this.content.append(el("div", { class: "tool-call", text: `→ ${name}(${args})` }));
  }

  // The server's text is what is shown; it is split over the tokens when their own strings
  // add up to it, else the tokens share one span (their joint probability).
  spans(text, tokens) {
    const pieces = tokens.map((t) => t.token);
    const groups = pieces.join("") === text && pieces.every(Boolean)
      ? tokens.map((t) => [t.token, [t]]) : [[text, tokens]];
    for (const [piece, group] of groups) {
      const span = el("span", { class: "tok", title: describe(group), text: piece });
      span.dataset.p = String(Math.exp(group.reduce((sum, t) => sum + t.logprob, 0)));
      const temperature = group.find((t) => t.temperature !== undefined);
      if (temperature) span.dataset.t = String(temperature.temperature);
      colour(span, this.overlay);
      this.content.append(span);
    }
  }
}
