import { api, canWrite, isSysadmin } from "../api.js";
import { ago, clear, copyBlock, debounce, dialog, errorBox, h, toast } from "../dom.js";
import { subscribe } from "../live.js";

const TIMEOUT_S = 600;

function isActive(d) {
  if (typeof d.active === "boolean") return d.active;
  return d.last_seen != null && Date.now() - d.last_seen <= TIMEOUT_S * 1000;
}

// The token is shown once: in this panel, with a copy button and the first message to send.
export function tokenPanel(device, token, what = "created") {
  const http = `curl -X POST -H 'Content-Type: application/json' -d '{"temperature": 21.5}' ${location.origin}/api/v1/${token}/telemetry`;
  return h("section", { class: "panel note", role: "region", "aria-label": "Device token" },
    h("h2", {}, `Device ${device.name} ${what}`),
    h("p", {}, h("strong", {}, "Copy the access token now: it is shown only this once."),
      " Losing it means rotating it."),
    copyBlock(token, "token"),
    h("p", {}, "Send its first message over HTTP:"),
    copyBlock(http, "first message command"),
    h("p", {}, h("a", { href: `#/devices/${device.id}` }, "Open the device page"), " to watch it arrive and for MQTT, CoAP and AMQP."));
}

export async function render(main) {
  const params = new URLSearchParams((location.hash.split("?")[1]) || "");
  const write = canWrite();
  const created = h("div");
  const list = h("div", { class: "table-wrap" });
  const search = h("input", { type: "search", id: "search", placeholder: "name or id" });
  const type = h("select", { id: "f-type" }, h("option", { value: "" }, "any"), h("option", { value: "default" }, "default"), h("option", { value: "gateway" }, "gateway"));
  const status = h("select", { id: "f-status" }, h("option", { value: "" }, "any"), ["active", "maintenance", "disabled"].map((s) => h("option", { value: s }, s)));
  const activity = h("select", { id: "f-active" }, h("option", { value: "" }, "any"), h("option", { value: "true" }, "active"), h("option", { value: "false" }, "inactive"));
  const filters = h("div", { class: "row", role: "search" },
    h("label", { for: "search" }, "Search", search),
    h("label", { for: "f-type" }, "Type", type),
    h("label", { for: "f-status" }, "Status", status),
    h("label", { for: "f-active" }, "Activity", activity),
    write ? h("button", { type: "button", class: "primary", onclick: () => create() }, "Create device") : null);
  clear(main, h("h1", {}, "Devices"), created, filters, list);
  let devices = [];
  let total = 0;

  async function load() {
    const q = new URLSearchParams({ limit: "1000" });
    if (search.value) q.set("search", search.value);
    if (type.value) q.set("type", type.value);
    if (status.value) q.set("status", status.value);
    if (activity.value) q.set("active", activity.value);
    try {
      const page = await api("GET", `/api/devices?${q}`);
      devices = page.items;
      total = page.total;
      draw();
    } catch (error) {
      clear(list, errorBox(error));
    }
  }

  function draw() {
    // Filtered here too, so the screen is right whatever filters the server applies.
    const text = search.value.trim().toLowerCase();
    const shown = devices.filter((d) =>
      (!text || d.name.toLowerCase().includes(text) || d.id.includes(text)) &&
      (!type.value || (d.type || "default") === type.value) &&
      (!status.value || d.status === status.value) &&
      (!activity.value || String(isActive(d)) === activity.value));
    if (!devices.length) {
      clear(list, h("p", { class: "note" }, write ? "No device yet: create the first one with the button above." : "No device yet."));
      return;
    }
    clear(list, h("table", {},
      h("caption", { class: "muted" }, `${shown.length} shown of ${total}`),
      h("thead", {}, h("tr", {}, ["Name", "Type", "Status", "Connected", "Last seen", write ? "Actions" : null].filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, shown.map((d) => h("tr", { dataset: { id: d.id } },
        h("td", {}, h("a", { href: `#/devices/${d.id}` }, d.name)),
        h("td", {}, d.type || "default"),
        h("td", {}, h("span", { class: d.status === "disabled" ? "bad" : "" }, d.status)),
        h("td", {}, d.connected ? h("span", { class: "on" }, "connected") : h("span", { class: "off" }, "no")),
        h("td", { title: d.last_seen ? new Date(d.last_seen).toISOString() : "" }, ago(d.last_seen), isActive(d) ? "" : h("span", { class: "muted" }, " (inactive)")),
        write ? h("td", {}, actions(d)) : null)))));
  }

  function actions(d) {
    return h("div", { class: "row" },
      h("button", { type: "button", onclick: () => rename(d), "aria-label": `Rename ${d.name}` }, "Rename"),
      h("button", { type: "button", onclick: () => changeStatus(d), "aria-label": `Change status of ${d.name}` }, "Status"),
      h("button", { type: "button", onclick: () => rotate(d), "aria-label": `Rotate token of ${d.name}` }, "Rotate token"),
      h("button", { type: "button", class: "danger", onclick: () => remove(d), "aria-label": `Delete ${d.name}` }, "Delete"));
  }

  async function create() {
    const fields = [h("label", {}, "Name", h("input", { name: "name", required: true, autofocus: true })),
      h("label", {}, "Type", h("select", { name: "type" }, h("option", { value: "default" }, "default"), h("option", { value: "gateway" }, "gateway")))];
    if (isSysadmin()) {
      let tenants = [];
      try { tenants = (await api("GET", "/api/tenants?limit=1000")).items; } catch (error) { toast(error.message); }
      fields.push(h("label", {}, "Tenant", h("select", { name: "tenant_id", required: true }, tenants.map((t) => h("option", { value: t.id }, t.name)))));
    }
    const values = await dialog("Create a device", fields, "Create");
    if (!values) return;
    const body = { name: values.name };
    if (values.type && values.type !== "default") body.type = values.type;
    if (values.tenant_id) body.tenant_id = values.tenant_id;
    try {
      const device = await api("POST", "/api/devices", body);
      clear(created, tokenPanel(device, device.token));
      created.querySelector("button").focus();
      await load();
    } catch (error) {
      clear(created, errorBox(error));
    }
  }

  async function rename(d) {
    const values = await dialog(`Rename ${d.name}`, [h("label", {}, "New name", h("input", { name: "name", required: true, value: d.name }))]);
    if (values) await change(() => api("PATCH", `/api/devices/${d.id}`, { name: values.name }), "renamed");
  }

  async function changeStatus(d) {
    const values = await dialog(`Status of ${d.name}`, [h("label", {}, "Status (disabled refuses its data)",
      h("input", { name: "status", required: true, value: d.status, list: "statuses" })),
      h("datalist", { id: "statuses" }, ["active", "maintenance", "disabled"].map((s) => h("option", { value: s })))]);
    if (values) await change(() => api("PATCH", `/api/devices/${d.id}`, { status: values.status }), "status changed");
  }

  async function rotate(d) {
    const ok = await dialog(`Rotate the token of ${d.name}?`, [h("p", {}, "The current token stops working at once.")], "Rotate", true);
    if (!ok) return;
    try {
      const device = await api("POST", `/api/devices/${d.id}/token`);
      clear(created, tokenPanel(device, device.token, "has a new token"));
    } catch (error) {
      clear(created, errorBox(error));
    }
  }

  async function remove(d) {
    const ok = await dialog(`Delete ${d.name}?`, [h("p", {}, "The device and all its telemetry are deleted. This cannot be undone.")], "Delete", true);
    if (ok) await change(() => api("DELETE", `/api/devices/${d.id}`), "deleted");
  }

  async function change(call, what) {
    try {
      await call();
      toast(`Device ${what}.`);
      await load();
    } catch (error) {
      clear(created, errorBox(error));
    }
  }

  const redraw = debounce(draw, 150);
  search.addEventListener("input", redraw);
  for (const el of [type, status, activity]) el.addEventListener("change", load);
  await load();
  if (params.get("new") === "1" && write) create();
  const off = subscribe(["device", "connectivity"], null, debounce(load, 1000));
  const timer = setInterval(draw, 15000); // keeps "last seen" fresh
  return () => { off(); clearInterval(timer); };
}
