// The left panel: model, sampling, steering, decoding method and adaptive temperature, read
// into the fields of a chat request. Nothing is sent that the user left at its default.

import { decodingMethods, el, objectForm } from "./forms.js";

const $ = (id) => document.getElementById(id);

// The adaptive-temperature schema lists every method's fields together; these are each one's.
const TEMPERATURE_FIELDS = {
  edt: ["t0", "theta", "n"],
  dynatemp: ["t0", "range", "exponent"],
  learned: ["head", "level", "choice"],
};

function numberOr(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

// "10-15" -> {start, end}; "3, 5" -> [3, 5]; "" -> undefined (the server's default).
// A box's JSON, or its text as typed so the server says what is wrong (undefined: empty).
function jsonOrText(id) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export function parseLayers(text) {
  const value = text.trim();
  const range = /^(\d+)\s*-\s*(\d+)$/.exec(value);
  if (range) return { start: Number(range[1]), end: Number(range[2]) };
  return value ? value.split(",").map((part) => Number(part.trim())) : undefined;
}

// "1:0, 1:3" -> [[1, 0], [1, 3]]
function parseHeads(text) {
  const pairs = text.split(",").map((part) => part.trim()).filter(Boolean);
  return pairs.length ? pairs.map((pair) => pair.split(":").map(Number)) : undefined;
}

export class Settings {
  constructor(onChange) {
    this.onChange = onChange;
    this.config = null;
    this.models = [];  // /v1/models cards
    this.vectors = [];  // /v1/steering/vectors cards
    this.components = {};
    this.methods = [];  // [{name, schema}] from /openapi.json
    this.decodingForm = null;
    this.temperatureForm = null;
    this.wire();
  }

  wire() {
    const scale = $("steer-scale");
    const scaleText = $("steer-scale-value");
    scale.addEventListener("input", () => { scaleText.value = scale.value; });
    scaleText.addEventListener("input", () => {  // the slider follows when it can
      if (Number.isFinite(Number(scaleText.value))) scale.value = scaleText.value;
    });
    $("steer-vector").addEventListener("change", () => this.vectorChosen());
    $("steer-mode").addEventListener("change", () => this.syncSteering());
    $("steer-target").addEventListener("change", () => this.syncSteering());
    $("steer-layers-auto").addEventListener("change", () => this.syncSteering());
    for (const id of ["steer-layer-start", "steer-layer-end"]) {
      $(id).addEventListener("input", () => this.orderLayers(id));
    }
    $("model").addEventListener("change", () => this.layerBounds());
    $("decoding-method").addEventListener("change", () => this.renderDecoding());
    $("temp-method").addEventListener("change", () => this.renderTemperature());
    $("controls").addEventListener("input", () => this.onChange());
    $("controls").addEventListener("change", () => this.onChange());
  }

  // Called once the server answered: its config, the schemas, the models and vectors.
  setup(config, openapi) {
    this.config = config;
    this.components = openapi.components.schemas;
    this.methods = decodingMethods(openapi);
    $("decoding-method").replaceChildren(el("option", { value: "", text: "plain" }),
      ...this.methods.map(({ name }) => el("option", { value: name, text: name })));
    const temperature = this.components.AdaptiveTemperatureRequest.properties.method.enum
      .filter((m) => m !== "learned" || config.temperature_heads.length);
    $("temp-method").replaceChildren(el("option", { value: "", text: "off" }),
      ...temperature.map((m) => el("option", { value: m, text: m })));
    $("extract-note").hidden = config.runtime_vectors;
    $("extract-button").disabled = !config.runtime_vectors;
  }

  setModels(models) {
    const chosen = $("model").value || this.config.default_model;
    const same = models.map((m) => m.id).join() === this.models.map((m) => m.id).join();
    this.models = models;
    $("model").replaceChildren(...models.map((m) => el("option", {
      value: m.id, selected: m.id === chosen,
      text: m.parent ? `${m.id} (adapter on ${m.parent})` : m.id,
    })));
    this.layerBounds();
    // The method forms offer the served models: made again only when those change, so
    // what was typed into them stays.
    if (!same) this.renderDecoding();
  }

  setVectors(vectors, choose = null) {
    const chosen = choose || $("steer-vector").value;
    this.vectors = vectors;
    const options = vectors.map((v) => el("option", {
      value: v.id, selected: v.id === chosen,
      text: `${v.id} (${v.model || "any model"}, layers ${v.layers[0]}–${v.layers.at(-1)})`,
    }));
    if (!options.length) options.push(el("option", { value: "", text: "(none: extract one)" }));
    $("steer-vector").replaceChildren(...options);
    this.vectorChosen();
  }

  model() {
    return $("model").value;
  }

  // The hosted model under the chosen name (an adapter's parent).
  hostedModel() {
    const card = this.models.find((m) => m.id === this.model());
    return (card && card.parent) || this.model();
  }

  layerBounds() {
    const info = this.config && this.config.models[this.hostedModel()];
    const last = info ? info.num_layers - 1 : 0;
    for (const id of ["steer-layer-start", "steer-layer-end"]) $(id).max = String(last);
    const heads = info ? `, heads 0–${info.num_heads - 1}` : "";
    $("steer-heads").placeholder = `layer:head, e.g. ${last}:0, ${last}:1${heads}`;
    this.syncSteering();
  }

  // A vector's own layers and target become the controls' starting point.
  vectorChosen() {
    const vector = this.vectors.find((v) => v.id === $("steer-vector").value);
    if (vector) {
      $("steer-layer-start").value = String(Math.min(...vector.layers));
      $("steer-layer-end").value = String(Math.max(...vector.layers));
      $("steer-target").value = vector.target;
    }
    this.syncSteering();
  }

  orderLayers(moved) {
    const start = $("steer-layer-start");
    const end = $("steer-layer-end");
    if (Number(start.value) > Number(end.value)) {
      if (moved === "steer-layer-start") end.value = start.value;
      else start.value = end.value;
    }
    this.syncSteering();
  }

  // Controls that do not apply are disabled rather than silently ignored.
  syncSteering() {
    const ablate = $("steer-mode").value === "ablate";
    $("steer-scale").disabled = ablate;
    $("steer-scale-value").disabled = ablate;
    const auto = $("steer-layers-auto").checked;
    $("steer-layer-start").disabled = auto;
    $("steer-layer-end").disabled = auto;
    $("steer-start-label").textContent = $("steer-layer-start").value;
    $("steer-end-label").textContent = $("steer-layer-end").value;
    $("steer-heads-field").hidden = $("steer-target").value !== "heads";
  }

  formContext() {
    return {
      components: this.components, models: this.models.map((m) => m.id), model: this.model(),
      choices: { head: this.config.temperature_heads }, onChange: this.onChange,
    };
  }

  renderDecoding() {
    const method = this.methods.find((m) => m.name === $("decoding-method").value);
    this.decodingForm = method ? objectForm(method.schema, this.formContext()) : null;
    $("decoding-fields").replaceChildren(...(this.decodingForm ? [this.decodingForm.node] : []));
    this.onChange();
  }

  renderTemperature() {
    const method = $("temp-method").value;
    const schema = this.components.AdaptiveTemperatureRequest;
    const keep = TEMPERATURE_FIELDS[method] || [];
    const skip = Object.keys(schema.properties).filter((name) => !keep.includes(name));
    this.temperatureForm = method ? objectForm(schema, this.formContext(), { skip }) : null;
    $("temp-fields").replaceChildren(...(this.temperatureForm ? [this.temperatureForm.node]
      : []));
    this.onChange();
  }

  // The scale as typed: a number, or the text itself so the server says what is wrong.
  scale() {
    const text = $("steer-scale-value").value.trim();
    return text !== "" && Number.isFinite(Number(text)) ? Number(text) : text;
  }

  steering() {
    if (!$("steer-on").checked || !$("steer-vector").value) return undefined;
    const item = { vector: $("steer-vector").value };
    const mode = $("steer-mode").value;
    if (mode !== "ablate") item.scale = this.scale();
    if (mode !== "add") item.mode = mode;
    if (!$("steer-layers-auto").checked) {
      item.layers = { start: Number($("steer-layer-start").value),
        end: Number($("steer-layer-end").value) };
    }
    if ($("steer-target").value !== "residual") {
      item.target = $("steer-target").value;
      item.heads = parseHeads($("steer-heads").value);
    }
    if ($("steer-apply").value !== "both") item.apply_to = $("steer-apply").value;
    if ($("steer-normalize").checked) item.normalize = true;
    return [item];
  }

  decoding() {
    return this.decodingForm ? this.decodingForm.read() : undefined;  // with its `method`
  }

  adaptiveTemperature() {
    return this.temperatureForm
      ? { method: $("temp-method").value, ...this.temperatureForm.read() } : undefined;
  }

  // The sampling fields every request shares (with or without the settings above), with
  // the output format and tools: a compared pair shows the same schema steered and not.
  sampling() {
    return {
      max_tokens: numberOr("max-tokens"), temperature: numberOr("temperature"),
      top_p: numberOr("top-p"), seed: numberOr("seed"), ...this.structured(),
    };
  }

  structured() {
    const fields = {};
    const schema = jsonOrText("json-schema");
    if (schema !== undefined) {
      fields.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
    }
    const tools = jsonOrText("tools");
    if (tools !== undefined) {
      fields.tools = tools;
      fields.tool_choice = $("tool-choice").value;
    }
    return fields;
  }

  // The request's extensions: steering, decoding method and adaptive temperature.
  extensions() {
    const adaptive = this.adaptiveTemperature();
    return { steering: this.steering(), decoding: this.decoding(),
      adaptive_temperature: adaptive };
  }

  extractionBody() {
    const lines = (id) => $(id).value.split("\n").map((l) => l.trim()).filter(Boolean);
    return {
      name: $("extract-name").value.trim(), model: this.hostedModel(),
      method: $("extract-method").value, layers: parseLayers($("extract-layers").value),
      positive: lines("extract-positive"), negative: lines("extract-negative"),
    };
  }
}
