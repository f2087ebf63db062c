// Parameter forms built from the server's /openapi.json, so the page offers every registered
// decoding method (they are plug-ins) with the server's own bounds and descriptions, and
// sends only the fields the user set (the server fills in its documented defaults).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export function resolve(schema, components) {
  if (schema && schema.$ref) return components[schema.$ref.split("/").pop()];
  return schema;
}

// {schema, optional}: a property without its `anyOf [..., null]` wrapper.
function unwrap(property, components) {
  const options = property.anyOf || [property];
  const real = options.filter((option) => option.type !== "null");
  const schema = real.length === 1 ? resolve(real[0], components) : { anyOf: real };
  return { schema: { ...schema, description: property.description }, optional: real.length
    < options.length || property.default !== undefined };
}

// A string naming a hosted model or an adapter gets a select of the served models.
function isModelReference(name, schema) {
  return schema.type === "string" && (name === "model"
    || /hosted model/.test(schema.description || ""));
}

function option(value, label = value, selected = false) {
  return el("option", { value, text: label, selected });
}

// One input for a scalar schema; `read()` gives the value, or undefined when left unset.
function scalarInput(name, schema, optional, context) {
  if (schema.enum || schema.type === "boolean") {
    const values = schema.enum || ["true", "false"];
    const select = el("select", { name },
      optional ? option("", "(default)") : null, ...values.map((v) => option(String(v))));
    const parse = schema.type === "boolean" ? (v) => v === "true" : (v) => v;
    return { node: select, read: () => (select.value === "" ? undefined : parse(select.value)) };
  }
  const choices = (context.choices || {})[name];
  if (choices) {  // names only the server knows (temperature heads)
    const select = el("select", { name },
      optional ? option("", "(default)") : null, ...choices.map((c) => option(c)));
    return { node: select, read: () => (select.value === "" ? undefined : select.value) };
  }
  if (isModelReference(name, schema)) {
    const select = el("select", { name },
      ...context.models.map((m) => option(m, m, m === context.model)));
    return { node: select, read: () => select.value };
  }
  if (schema.type === "number" || schema.type === "integer") {
    const input = el("input", {
      type: "number", name, step: schema.type === "integer" ? 1 : "any",
      min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum ?? schema.exclusiveMaximum,
      placeholder: optional ? "default" : "", value: optional ? undefined : 1,
    });
    return { node: input, read: () => (input.value === "" ? undefined : Number(input.value)) };
  }
  // Strings, and unions such as DoLa's layers: "high", "low" or block indices ("1, 3").
  const input = el("input", { type: "text", name, placeholder: optional ? "default" : "" });
  const numbers = Boolean(schema.anyOf && schema.anyOf.some((s) => s.type === "array"));
  return { node: input, read: () => parseText(input.value, numbers) };
}

// Text as typed; "1, 3" (or "1") becomes [1, 3] where the field also takes a list of ints.
function parseText(text, numbers) {
  const value = text.trim();
  if (value === "") return undefined;
  if (numbers && /^-?\d+(\s*,\s*-?\d+)*$/.test(value)) return value.split(",").map(Number);
  return value;
}

function label(name, schema, control) {
  return el("label", { class: "field", title: schema.description || "" },
    el("span", { text: name.replaceAll("_", " ") }), control);
}

// A list of objects (logit arithmetic's terms): one row of inputs per item, add/remove rows.
function listInput(name, itemSchema, schema, context) {
  const rows = [];
  const body = el("div", { class: "rows" });
  const addRow = () => {
    if (rows.length >= (schema.maxItems || 16)) return;
    const form = objectForm(itemSchema, context, { compact: true });
    const row = el("div", { class: "row" }, form.node, el("button", {
      type: "button", class: "small", text: "×", title: "remove",
      onclick: () => { rows.splice(rows.indexOf(form), 1); row.remove(); context.onChange(); },
    }));
    rows.push(form);
    body.append(row);
    context.onChange();
  };
  for (let i = 0; i < (schema.minItems || 1); i += 1) addRow();
  const node = el("div", { class: "list", title: schema.description || "" },
    el("span", { class: "list-name", text: name }), body,
    el("button", { type: "button", class: "small", text: `+ ${name.replace(/s$/, "")}`,
      onclick: addRow }));
  return { node, read: () => rows.map((form) => form.read()) };
}

// A form for an object schema; `read()` gives the object of the fields that are set.
export function objectForm(schema, context, { skip = [], compact = false } = {}) {
  const required = new Set(schema.required || []);
  const inputs = {};
  const fixed = {};  // single-valued fields (a method's own name): sent, never shown
  const node = el("div", { class: compact ? "fields compact" : "fields" });
  for (const [name, property] of Object.entries(schema.properties || {})) {
    if (skip.includes(name)) continue;
    if (property.const !== undefined) {
      fixed[name] = property.const;
      continue;
    }
    const { schema: field, optional } = unwrap(property, context.components);
    const item = resolve(field.items, context.components);
    if (field.type === "array" && item && item.type === "object") {
      inputs[name] = listInput(name, item, field, context);
      node.append(inputs[name].node);
    } else {
      inputs[name] = scalarInput(name, field, optional && !required.has(name), context);
      node.append(label(name, field, inputs[name].node));
    }
  }
  node.addEventListener("input", () => context.onChange());
  node.addEventListener("change", () => context.onChange());
  const read = () => ({ ...fixed, ...Object.fromEntries(Object.entries(inputs)
    .map(([name, input]) => [name, input.read()]).filter(([, value]) => value !== undefined)) });
  return { node, read };
}

// The decoding methods the server offers: [{name, schema}] from the chat request's schema.
export function decodingMethods(openapi) {
  const components = openapi.components.schemas;
  const decoding = components.ChatCompletionRequest.properties.decoding;
  const choices = decoding.anyOf.find((option) => option.oneOf).oneOf;
  return choices.map((ref) => resolve(ref, components))
    .map((schema) => ({ name: schema.properties.method.const, schema }));
}
