// The rules screen: the list, and a form (or, for the advanced, JSON) to create and edit rules.
// The API is the one judge of a rule: its validation message is shown word for word.
import { api, canWrite, isSysadmin } from "../api.js";
import { clear, dialog, errorBox, h, toast } from "../dom.js";
import { FormError, ruleForm } from "./rule_form.js";
import { ruleTable } from "./rule_list.js";
import { withoutServerFields } from "./rule_model.js";

async function items(path) {
  try {
    return (await api("GET", path)).items || [];
  } catch {
    return []; // names and choices are a nicety: ids are shown instead
  }
}

export async function render(main) {
  const write = canWrite();
  const sysadmin = isSysadmin();
  const [devices, tenants] = await Promise.all([items("/api/devices?limit=1000"), sysadmin ? items("/api/tenants?limit=1000") : []]);
  const deviceNames = Object.fromEntries(devices.map((d) => [d.id, d.name]));
  const tenantNames = Object.fromEntries(tenants.map((t) => [t.id, t.name]));
  const list = h("div", { class: "table-wrap" });
  const listErr = h("div", { "aria-live": "polite" });
  let rules = [];

  async function load() {
    try {
      const page = await api("GET", "/api/rules?limit=1000");
      rules = page.items || [];
      clear(list, ruleTable(rules, page.total ?? rules.length,
        { write, sysadmin, deviceNames, tenantNames, onToggle: toggle, onEdit: open, onDelete: remove }));
    } catch (error) {
      clear(list, errorBox(error, "Rules"));
    }
  }

  if (!write) { // a tenant_user reads rules; the API refuses any change anyway
    clear(main, h("h1", {}, "Rules"), list);
    await load();
    return null;
  }

  const form = ruleForm({ sysadmin, tenants, devices });
  let editing = null; // the rule being edited, or null for a new one
  const title = h("h2", { id: "rule-h" }, "New rule");
  const err = h("div", { id: "rule-error", "aria-live": "polite" });
  const save = h("button", { type: "submit", class: "primary" }, "Create rule");
  const cancel = h("button", { type: "button", onclick: () => { edit(null); form.focus(); } }, "Cancel");
  form.el.append(err, h("div", { class: "row" }, save, cancel));

  const json = h("textarea", { id: "rule-json", rows: 14, spellcheck: "false", "aria-describedby": "rule-json-hint" });
  const jsonErr = h("div", { id: "rule-json-error", "aria-live": "polite" });
  const advanced = h("details", { class: "advanced" }, h("summary", {}, "JSON (advanced)"),
    h("p", { class: "hint", id: "rule-json-hint" }, "The rule as the API receives it (docs/alarms.md). Saving it here sends it as it is, without the form."),
    h("label", { for: "rule-json" }, "Rule as JSON", json), jsonErr,
    h("div", { class: "row" }, h("button", { type: "button", onclick: saveJson }, "Save JSON")));
  advanced.addEventListener("toggle", () => { if (advanced.open) refreshJson(); });

  const panel = h("section", { class: "panel", "aria-labelledby": "rule-h" }, title, form.el, advanced);
  const newRule = h("button", { type: "button", class: "primary", onclick: () => { edit(null); form.focus(); } }, "New rule");
  clear(main, h("div", { class: "heading-row" }, h("h1", {}, "Rules"), newRule), listErr, list, panel);

  function body() {
    const b = form.read();
    return editing || !sysadmin ? b : { ...b, tenant_id: form.tenantOf() };
  }

  function refreshJson() {
    clear(jsonErr);
    try {
      json.value = JSON.stringify(body(), null, 2);
    } catch {
      json.value = JSON.stringify(editing ? withoutServerFields(editing) : {}, null, 2);
    }
  }

  function edit(rule) {
    editing = rule;
    title.textContent = rule ? `Edit rule ${rule.name}` : "New rule";
    save.textContent = rule ? "Save changes" : "Create rule";
    cancel.hidden = !rule;
    clear(err);
    clear(jsonErr);
    form.fill(rule);
    if (advanced.open) refreshJson();
  }

  function open(rule) { // the list's Edit: the form, filled, with the focus in it
    edit(rule);
    form.focus();
  }

  async function send(payload, box) {
    const rule = editing;
    save.disabled = true;
    try {
      await api(rule ? "PUT" : "POST", rule ? `/api/rules/${rule.id}` : "/api/rules", payload);
      toast(rule ? `Rule ${payload.name} saved.` : `Rule ${payload.name} created.`);
      edit(null);
      await load();
      form.focus();
    } catch (error) {
      clear(box, errorBox(error));
      if (box === err) form.mark(error.message, box.id); // JSON sent by hand may not match the form
    } finally {
      save.disabled = false;
    }
  }

  form.el.addEventListener("submit", async (e) => {
    e.preventDefault();
    form.unmark();
    clear(err);
    let payload;
    try {
      payload = body();
    } catch (error) {
      if (!(error instanceof FormError)) throw error;
      clear(err, errorBox(error));
      form.mark(error.field, err.id);
      return;
    }
    await send(payload, err);
  });

  async function saveJson() {
    form.unmark();
    clear(jsonErr);
    let payload;
    try {
      payload = JSON.parse(json.value);
    } catch (error) {
      clear(jsonErr, errorBox(`Not valid JSON: ${error.message}`));
      return;
    }
    await send(payload, jsonErr);
  }

  async function toggle(rule) {
    const on = rule.enabled === false;
    clear(listErr);
    try {
      await api("PATCH", `/api/rules/${rule.id}`, { enabled: on });
      toast(`Rule ${rule.name} ${on ? "enabled" : "disabled"}.`);
      if (editing && editing.id === rule.id) form.setEnabled(on);
      await load();
      list.querySelector(`tr[data-id="${rule.id}"] button`)?.focus(); // the new Enable/Disable
    } catch (error) {
      clear(listErr, errorBox(error));
    }
  }

  async function remove(rule) {
    const ok = await dialog(`Delete rule ${rule.name}?`,
      [h("p", {}, "Its open alarms stay until they are cleared. This cannot be undone.")], "Delete", true);
    if (!ok) return;
    clear(listErr);
    try {
      await api("DELETE", `/api/rules/${rule.id}`);
      toast(`Rule ${rule.name} deleted.`);
      if (editing && editing.id === rule.id) edit(null);
      await load();
      newRule.focus(); // its row, and the button that had the focus, are gone
    } catch (error) {
      clear(listErr, errorBox(error));
    }
  }

  edit(null);
  await load();
  return null;
}
