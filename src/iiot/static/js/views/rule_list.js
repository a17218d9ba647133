// The rules table: what each rule watches, in words, and (for those who may) its actions.
import { h } from "../dom.js";
import { describeRule, describeTarget } from "./rule_model.js";

export function ruleTable(items, total, { write, sysadmin, deviceNames, tenantNames, onToggle, onEdit, onDelete }) {
  if (!items.length) {
    return h("p", { class: "note" }, write ? "No rule yet: create the first one with the form below." : "No rule yet.");
  }
  const heads = ["Name", sysadmin ? "Tenant" : null, "Applies to", "Condition", "Severity", "State", write ? "Actions" : null];
  return h("table", { class: "rules" },
    h("caption", { class: "muted" }, items.length < total ? `${items.length} shown of ${total}` : `${total} rule${total === 1 ? "" : "s"}`),
    h("thead", {}, h("tr", {}, heads.filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, items.map((r) => {
      const on = r.enabled !== false;
      return h("tr", { dataset: { id: r.id, enabled: String(on) } },
        h("th", { scope: "row" }, r.name,
          r.alarm_type && r.alarm_type !== r.name ? h("div", { class: "muted" }, `alarm type ${r.alarm_type}`) : null),
        sysadmin ? h("td", {}, tenantNames[r.tenant_id] || r.tenant_id) : null,
        h("td", {}, describeTarget(r.target, deviceNames)),
        h("td", {}, describeRule(r)),
        h("td", {}, h("span", { class: `badge sev-${r.severity}` }, r.severity)),
        h("td", {}, h("span", { class: on ? "on" : "off" }, on ? "enabled" : "disabled")),
        write ? h("td", {}, h("div", { class: "row actions" },
          h("button", { type: "button", onclick: () => onToggle(r), "aria-label": `${on ? "Disable" : "Enable"} ${r.name}` }, on ? "Disable" : "Enable"),
          h("button", { type: "button", onclick: () => onEdit(r), "aria-label": `Edit ${r.name}` }, "Edit"),
          h("button", { type: "button", class: "danger", onclick: () => onDelete(r), "aria-label": `Delete ${r.name}` }, "Delete"))) : null);
    })));
}
