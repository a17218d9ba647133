// Form controls for one condition ({op, value, for_s}) and for a duration in seconds.
import { h } from "../dom.js";
import { NUMERIC_OPS, OPS, UNITS, splitSeconds, toSeconds, valueKind } from "./rule_model.js";

// What the form itself cannot turn into the API's JSON (a number that is not one);
// everything else is left to the API, whose message is shown as it says it.
export class FormError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

// A number of seconds, typed as an amount and a unit (engineers think in minutes and hours).
export function durationInput(id, label, required = false) {
  const amount = h("input", { id, type: "number", min: "0", step: "any", inputmode: "decimal", required, class: "amount" });
  const unit = h("select", { id: `${id}-unit` }, UNITS.map((u) => h("option", { value: u.unit }, u.label)));
  const el = h("div", { class: "duration" },
    h("label", { for: id }, label, amount),
    h("label", { for: `${id}-unit`, class: "unit" }, h("span", { class: "vh" }, `${label}: `), "Unit", unit));
  return {
    el,
    amount,
    fill(seconds) {
      const parts = splitSeconds(seconds);
      amount.value = String(parts.amount);
      unit.value = parts.unit;
    },
    // An empty field is 0 s; the browser refuses text in a number field before we get here.
    read() {
      const n = amount.value === "" ? 0 : Number(amount.value);
      return toSeconds(n, unit.value);
    },
  };
}

const KINDS = [["number", "a number"], ["text", "text"], ["bool", "true or false"]];

// `path` is the API's name of the condition (create, clear): its messages start with it.
export function conditionFields(prefix, path) {
  const op = h("select", { id: `${prefix}-op` }, OPS.map((o) => h("option", { value: o.op }, `${o.label} (${o.symbol})`)));
  const kind = h("select", { id: `${prefix}-kind` }, KINDS.map(([v, t]) => h("option", { value: v }, t)));
  const text = h("input", { id: `${prefix}-value`, type: "text", autocomplete: "off", spellcheck: "false" });
  const bool = h("select", { id: `${prefix}-value` }, h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  const valueLabel = h("label", { for: `${prefix}-value` }, "Value", text);
  const kindLabel = h("label", { for: `${prefix}-kind` }, "Value is", kind);
  const wait = durationInput(`${prefix}-for`, "For at least");
  const el = h("div", { class: "row condition" },
    h("label", { for: `${prefix}-op` }, "Condition", op), kindLabel, valueLabel, wait.el);

  // Above/below compare numbers only, so the kind of value is chosen only for equals/differs.
  function sync() {
    const numeric = NUMERIC_OPS.has(op.value);
    if (numeric) kind.value = "number";
    kindLabel.hidden = numeric;
    kind.disabled = numeric;
    const control = kind.value === "bool" ? bool : text;
    if (valueLabel.lastChild !== control) valueLabel.replaceChildren("Value", control);
    text.inputMode = kind.value === "number" ? "decimal" : "text";
    text.required = kind.value === "number";
  }
  op.addEventListener("change", sync);
  kind.addEventListener("change", sync);
  sync();

  return {
    el,
    fill(c) {
      op.value = c.op;
      kind.value = valueKind(c.value);
      text.value = c.value === null || c.value === undefined || typeof c.value === "boolean" ? "" : String(c.value);
      bool.value = String(c.value === true);
      wait.fill(c.for_s || 0);
      sync();
    },
    read() {
      let value;
      if (kind.value === "bool") value = bool.value === "true";
      else if (kind.value === "text") value = text.value;
      else {
        value = Number(text.value.trim());
        if (text.value.trim() === "" || !Number.isFinite(value)) {
          throw new FormError(`${path}.value`, `${path}.value: “${text.value}” is not a number`);
        }
      }
      return { op: op.value, value, for_s: wait.read() };
    },
    // The control an API message about `${path}.<field>` is about.
    control(field) {
      if (field === "value") return valueLabel.lastChild;
      if (field === "for_s") return wait.amount;
      return op;
    },
  };
}
