// The rule form: every field of the rules API as a labelled control, turned into the API's JSON.
import { api } from "../api.js";
import { clear, debounce, h } from "../dom.js";
import { FormError, conditionFields, durationInput } from "./rule_condition.js";
import { NEW_RULE, SEVERITIES, describeRule, describeTarget } from "./rule_model.js";

function radios(name, choices) {
  return h("div", { class: "choices" }, choices.map(([value, text]) =>
    h("label", { class: "inline" }, h("input", { type: "radio", name, value }), text)));
}

function checked(group) {
  const input = group.querySelector("input:checked");
  return input ? input.value : null;
}

function check(group, value) {
  for (const input of group.querySelectorAll("input")) input.checked = input.value === value;
}

// Shows one fieldset of a choice and disables the other, so its `required` fields do not block.
function show(set, visible) {
  set.hidden = !visible;
  set.disabled = !visible;
}

export function ruleForm({ sysadmin, tenants, devices }) {
  const name = h("input", { id: "rule-name", required: true, autocomplete: "off", "aria-describedby": "rule-name-hint" });
  const tenant = sysadmin ? h("select", { id: "rule-tenant", required: true }, tenants.map((t) => h("option", { value: t.id }, t.name))) : null;
  const kind = radios("rule-kind", [["threshold", "a value crosses a threshold"], ["inactivity", "a device sends nothing"]]);
  const scope = radios("rule-scope", [["device", "one device"], ["type", "every device of a type"]]);
  const device = h("select", { id: "rule-device", required: true });
  const type = h("input", { id: "rule-type", required: true, list: "rule-types", autocomplete: "off" });
  const types = h("datalist", { id: "rule-types" });
  const deviceLabel = h("label", { for: "rule-device" }, "Device", device);
  const typeLabel = h("label", { for: "rule-type" }, "Device type", type, types);
  const key = h("input", { id: "rule-key", required: true, list: "rule-keys", autocomplete: "off", spellcheck: "false" });
  const keys = h("datalist", { id: "rule-keys" });
  const create = conditionFields("rule-create", "create");
  const clearMode = radios("rule-clear-mode", [["auto", "the raise condition no longer holds"], ["own", "a condition of its own holds (hysteresis)"]]);
  const clearCond = conditionFields("rule-clear", "clear");
  const clearSet = h("fieldset", { class: "bare", "aria-label": "Clear condition" }, clearCond.el,
    h("p", { class: "hint" }, "Between the two thresholds nothing changes, so a value that flaps around the limit gives one alarm, not dozens."));
  const timeout = durationInput("rule-timeout", "Nothing received for", true);
  const severity = h("select", { id: "rule-severity" }, SEVERITIES.map((s) => h("option", { value: s }, s)));
  const alarmType = h("input", { id: "rule-alarm-type", autocomplete: "off", placeholder: "the rule's name", "aria-describedby": "rule-alarm-type-hint" });
  const enabled = h("input", { id: "rule-enabled", type: "checkbox" });
  const preview = h("p", { class: "note", id: "rule-preview" });

  const targetSet = h("fieldset", {}, h("legend", {}, "Applies to"), scope, h("div", { class: "row" }, deviceLabel, typeLabel));
  const raiseSet = h("fieldset", {}, h("legend", {}, "Raise an alarm when"),
    h("div", { class: "row" }, h("label", { for: "rule-key" }, "Telemetry key", key, keys)), create.el,
    h("p", { class: "hint" }, "“For at least” waits until the condition has held that long (0: at once)."));
  const clearOuter = h("fieldset", {}, h("legend", {}, "Clear the alarm when"), clearMode, clearSet);
  const silentSet = h("fieldset", {}, h("legend", {}, "Raise an alarm when the device has"), timeout.el,
    h("p", { class: "hint" }, "Its next message clears the alarm."));
  const form = h("form", { class: "rule-form" },
    h("div", { class: "row" },
      h("label", { for: "rule-name" }, "Name", name),
      tenant ? h("label", { for: "rule-tenant" }, "Tenant", tenant) : null),
    h("p", { class: "hint", id: "rule-name-hint" }, "Unique in the tenant, such as “Boiler overheating”."),
    h("fieldset", {}, h("legend", {}, "Watch for"), kind),
    targetSet, raiseSet, clearOuter, silentSet,
    h("fieldset", {}, h("legend", {}, "Alarm"),
      h("div", { class: "row" },
        h("label", { for: "rule-severity" }, "Severity", severity),
        h("label", { for: "rule-alarm-type" }, "Alarm type", alarmType),
        h("label", { class: "inline", for: "rule-enabled" }, enabled, "Enabled (evaluated)")),
      h("p", { class: "hint", id: "rule-alarm-type-hint" },
        "Empty: the rule's name. Rules that share an alarm type raise one alarm per device, escalated by the higher severity.")),
    preview);

  const tenantOf = () => (tenant ? tenant.value : null);
  const tenantDevices = () => devices.filter((d) => !tenant || d.tenant_id === tenant.value);
  const deviceNames = Object.fromEntries(devices.map((d) => [d.id, d.name]));

  function fillDevices(selected) {
    const mine = tenantDevices();
    const options = mine.map((d) => h("option", { value: d.id }, `${d.name} (${d.type || "default"})`));
    if (selected && !mine.some((d) => d.id === selected)) options.push(h("option", { value: selected }, deviceNames[selected] || selected));
    clear(device, h("option", { value: "" }, mine.length ? "Choose a device" : "No device in this tenant"), options);
    device.value = selected || "";
    const seen = new Set(["default", ...mine.map((d) => d.type || "default")]);
    clear(types, [...seen].sort().map((t) => h("option", { value: t })));
  }

  // Keys a device has sent, as suggestions (a device of the type stands in for the type).
  async function suggestKeys() {
    const source = checked(scope) === "device" ? device.value
      : (tenantDevices().find((d) => (d.type || "default") === type.value) || {}).id;
    if (!source) return clear(keys);
    try {
      const latest = await api("GET", `/api/devices/${source}/telemetry/latest`);
      clear(keys, Object.keys(latest || {}).sort().map((k) => h("option", { value: k })));
    } catch {
      clear(keys); // suggestions only: the key can always be typed
    }
  }

  function sync() {
    const threshold = checked(kind) !== "inactivity";
    show(raiseSet, threshold);
    show(clearOuter, threshold);
    show(silentSet, !threshold);
    show(clearSet, checked(clearMode) === "own");
    const one = checked(scope) === "device";
    deviceLabel.hidden = !one;
    device.disabled = !one;
    typeLabel.hidden = one;
    type.disabled = one;
    drawPreview();
  }

  function drawPreview() {
    let text;
    try {
      const rule = read();
      text = `${rule.severity} alarm on ${describeTarget(rule.target, deviceNames) || "…"} when ${describeRule(rule)}.`;
      if (!rule.enabled) text += " Disabled: not evaluated until enabled.";
    } catch {
      text = "";
    }
    preview.hidden = !text;
    preview.textContent = text ? `In short: ${text}` : "";
  }

  // The API's JSON, in the order docs/alarms.md shows it.
  function read() {
    const body = { name: name.value, kind: checked(kind) || "threshold" };
    body.target = checked(scope) === "device" ? { device_id: device.value } : { device_type: type.value };
    if (body.kind === "threshold") {
      body.key = key.value;
      body.create = create.read();
      if (checked(clearMode) === "own") body.clear = clearCond.read();
    } else {
      body.timeout_s = timeout.read();
    }
    body.severity = severity.value;
    if (alarmType.value !== "") body.alarm_type = alarmType.value;
    body.enabled = enabled.checked;
    return body;
  }

  // `rule` is a rule as the API returns it, or null for a new one.
  function fill(rule) {
    const r = rule || NEW_RULE;
    name.value = r.name;
    if (tenant) {
      if (rule) tenant.value = rule.tenant_id;
      tenant.disabled = Boolean(rule); // a rule stays in its tenant
    }
    check(kind, r.kind || "threshold");
    check(scope, r.target.device_id ? "device" : "type");
    fillDevices(r.target.device_id);
    type.value = r.target.device_type || "default";
    key.value = r.key || "";
    create.fill(r.create || NEW_RULE.create);
    check(clearMode, r.clear ? "own" : "auto");
    const c = r.create || NEW_RULE.create;
    clearCond.fill(r.clear || { op: c.op === "gt" || c.op === "ge" ? "lt" : "gt", value: c.value, for_s: 0 });
    timeout.fill(r.timeout_s || 300);
    severity.value = r.severity;
    alarmType.value = r.alarm_type && r.alarm_type !== r.name ? r.alarm_type : "";
    enabled.checked = r.enabled !== false;
    unmark();
    sync();
    suggestKeys();
  }

  function fieldFor(message) {
    if (/^a rule named /.test(message)) return name;
    const m = /^([a-z_]+)(?:\.([a-z_]+))?/.exec(message);
    if (!m) return null;
    const [, top, sub] = m;
    if (top === "create") return create.control(sub);
    if (top === "clear") return clearCond.control(sub);
    if (top === "target") return sub === "device_type" || (!sub && checked(scope) === "type") ? type : device;
    const byName = { name, key, severity, alarm_type: alarmType, enabled, timeout_s: timeout.amount, tenant_id: tenant, kind: kind.querySelector("input") };
    return byName[top] || null;
  }

  // Marks the control an error message names (the message itself is shown next to the form).
  function mark(message, describedBy) {
    const field = fieldFor(message);
    if (!field || field.disabled) return;
    field.setAttribute("aria-invalid", "true");
    field.setAttribute("aria-describedby", `${field.getAttribute("aria-describedby") || ""} ${describedBy}`.trim());
    field.focus();
  }

  function unmark() {
    for (const el of form.querySelectorAll("[aria-invalid]")) {
      el.removeAttribute("aria-invalid");
      const rest = (el.getAttribute("aria-describedby") || "").split(" ").filter((id) => id && id !== "rule-error" && id !== "rule-json-error");
      if (rest.length) el.setAttribute("aria-describedby", rest.join(" "));
      else el.removeAttribute("aria-describedby");
    }
  }

  for (const group of [kind, scope, clearMode]) group.addEventListener("change", sync);
  tenant?.addEventListener("change", () => { fillDevices(null); suggestKeys(); });
  device.addEventListener("change", suggestKeys);
  type.addEventListener("input", debounce(suggestKeys, 400));
  form.addEventListener("input", drawPreview);
  form.addEventListener("change", drawPreview);

  return {
    el: form,
    fill,
    read,
    mark,
    unmark,
    tenantOf,
    setEnabled(value) { enabled.checked = value; drawPreview(); },
    focus() { name.focus(); },
  };
}

export { FormError };
