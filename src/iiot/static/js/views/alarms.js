import { api, canWrite } from "../api.js";
import { clear, debounce, errorBox, fmtTime, fmtValue, h } from "../dom.js";
import { subscribe } from "../live.js";

const SEVERITIES = ["CRITICAL", "MAJOR", "MINOR", "WARNING", "INDETERMINATE"];
const STATUSES = ["ACTIVE_UNACK", "ACTIVE_ACK", "CLEARED_UNACK", "CLEARED_ACK"];

// Operators acknowledge (every role); clearing by hand is a tenant admin's.
export function alarmTable(items, reload, withDevice = true, names = {}) {
  const err = h("div");
  if (!items.length) return h("p", { class: "muted" }, "No alarm.");
  async function act(alarm, what) {
    try {
      await api("POST", `/api/alarms/${alarm.id}/${what}`);
      await reload();
    } catch (error) {
      clear(err, errorBox(error));
    }
  }
  return h("div", { class: "table-wrap" }, err, h("table", { class: "alarms" },
    h("thead", {}, h("tr", {}, ["Severity", "Type", withDevice ? "Device" : null, "Status", "Started", "Value", "Actions"].filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, items.map((a) => h("tr", { dataset: { id: a.id, status: a.status } },
      h("td", {}, h("span", { class: `badge sev-${a.severity}` }, a.severity)),
      h("td", {}, a.type),
      withDevice ? h("td", {}, h("a", { href: `#/devices/${a.device_id}` }, names[a.device_id] || a.device_id)) : null,
      h("td", {}, a.status),
      h("td", {}, fmtTime(a.start_ts)),
      h("td", { class: "num" }, a.value === undefined || a.value === null ? "" : fmtValue(a.value)),
      h("td", {}, h("div", { class: "row" },
        a.status && a.status.endsWith("_UNACK") ? h("button", { type: "button", onclick: () => act(a, "ack"), "aria-label": `Acknowledge ${a.type}` }, "Acknowledge") : null,
        canWrite() && a.status && a.status.startsWith("ACTIVE") ? h("button", { type: "button", class: "danger", onclick: () => act(a, "clear"), "aria-label": `Clear ${a.type}` }, "Clear") : null)))))));
}

export async function render(main) {
  const status = h("select", { id: "a-status" }, h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s }, s)));
  const severity = h("select", { id: "a-severity" }, h("option", { value: "" }, "any"), SEVERITIES.map((s) => h("option", { value: s }, s)));
  const type = h("input", { id: "a-type", type: "search" });
  const list = h("div");
  clear(main, h("h1", {}, "Alarms"),
    h("div", { class: "row", role: "search" }, h("label", { for: "a-status" }, "Status", status), h("label", { for: "a-severity" }, "Severity", severity),
      h("label", { for: "a-type" }, "Type", type)), list);
  const names = {};
  try {
    for (const d of (await api("GET", "/api/devices?limit=1000")).items) names[d.id] = d.name;
  } catch {
    // names are a nicety: ids are shown instead
  }
  async function load() {
    const q = new URLSearchParams({ limit: "200" });
    if (status.value) q.set("status", status.value);
    if (severity.value) q.set("severity", severity.value);
    if (type.value) q.set("type", type.value);
    try {
      const page = await api("GET", `/api/alarms?${q}`);
      clear(list, alarmTable(page.items || [], load, true, names));
    } catch (error) {
      clear(list, errorBox(error, "Alarms"));
    }
  }
  for (const el of [status, severity]) el.addEventListener("change", load);
  type.addEventListener("input", debounce(load, 300));
  await load();
  return subscribe(["alarm"], null, debounce(load, 300));
}
