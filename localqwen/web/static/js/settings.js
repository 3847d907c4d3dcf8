// A conversation's settings: the request fields they become, and the Settings dialog's form.
// Only settings the user gave are stored; the rest are the model's defaults (GET /props), shown as placeholders.

// Every setting and its JSON type (also what an imported file may carry).
export const SETTING_TYPES = {
  system: "string", temperature: "number", top_p: "number", top_k: "number", min_p: "number",
  presence_penalty: "number", seed: "number", max_tokens: "number", thinking_budget: "number",
  reasoning_effort: "string",
};

/** The request fields of `settings` (the system prompt goes in as a message instead). */
export function requestFields(settings) {
  return Object.fromEntries(Object.entries(settings).filter(([name]) => name !== "system" && name in SETTING_TYPES));
}

/** Offer the server's reasoning efforts ({name: budget in tokens, null: unlimited}) in `select`. */
export function addEffortOptions(select, efforts) {
  for (const [name, budget] of Object.entries(efforts)) {
    select.append(new Option(`${name} (${budget === null ? "unlimited" : `${budget.toLocaleString("en")} tokens`})`,
      name));
  }
}

export function fillForm(form, settings, props) {
  const defaults = { ...props.sampling, max_tokens: props.max_tokens };
  for (const element of form.elements) {
    if (!(element.name in SETTING_TYPES)) continue;
    element.value = settings[element.name] ?? "";
    if (element.name in defaults) element.placeholder = String(defaults[element.name]);
  }
}

export function readForm(form) {
  const settings = {};
  for (const [name, value] of new FormData(form)) {
    if (value !== "" && name in SETTING_TYPES) settings[name] = SETTING_TYPES[name] === "number" ? Number(value) : value;
  }
  return settings;
}
