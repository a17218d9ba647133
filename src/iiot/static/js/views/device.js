import { api } from "../api.js";
import { TelemetryChart } from "../chart.js";
import { ago, clear, errorBox, fmtTime, fmtValue, h } from "../dom.js";
import { subscribe } from "../live.js";
import { alarmsSection } from "./device_alarms.js";
import { attributesSection } from "./device_attributes.js";
import { commandsSection } from "./device_commands.js";
import { connectSection } from "./device_connect.js";

const RANGES = { "1h": 36e5, "24h": 864e5, "7d": 6048e5 };

export async function render(main, [id]) {
  let device;
  try {
    device = await api("GET", `/api/devices/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error.status === 404 || error.status === 400) {
      clear(main, h("h1", {}, "Device not found"),
        h("p", {}, "No device with this id exists, or it belongs to another tenant. "),
        h("a", { href: "#/devices" }, "Back to the devices"));
      return null;
    }
    throw error;
  }
  const cleanups = [];
  const head = h("div");
  function drawHead() {
    clear(head, h("h1", {}, device.name),
      h("p", { class: "muted" }, `id ${device.id} · type ${device.type || "default"} · status `,
        h("span", { class: device.status === "disabled" ? "bad" : "" }, device.status), " · ",
        device.connected ? h("span", { class: "on" }, "connected") : "not connected",
        ` · last seen ${ago(device.last_seen)}`));
  }
  drawHead();

  // Latest values, live.
  const latest = {};
  const latestBody = h("tbody");
  const latestBox = h("div", { class: "table-wrap" }, h("table", { id: "latest" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Key"), h("th", { scope: "col" }, "Value"), h("th", { scope: "col" }, "Time"))),
    latestBody));
  const latestEmpty = h("div");
  function drawLatest() {
    const keys = Object.keys(latest).sort();
    clear(latestBody, keys.map((k) => h("tr", { dataset: { key: k } },
      h("td", {}, k), h("td", { class: "num" }, fmtValue(latest[k].value)), h("td", {}, fmtTime(latest[k].ts)))));
    clear(latestEmpty, keys.length ? null : h("p", { class: "note" }, "No data yet. Send the first message: see How to connect below."));
  }

  // Chart of chosen keys over a range.
  const keyBox = h("fieldset", { class: "keys" }, h("legend", {}, "Keys"));
  const rangeSel = h("select", { id: "range" }, h("option", { value: "1h" }, "last 1 h"), h("option", { value: "24h", selected: true }, "last 24 h"),
    h("option", { value: "7d" }, "last 7 d"), h("option", { value: "custom" }, "custom"));
  const from = h("input", { type: "datetime-local", id: "from" });
  const to = h("input", { type: "datetime-local", id: "to" });
  const custom = h("span", { class: "row", hidden: true }, h("label", { for: "from" }, "From", from), h("label", { for: "to" }, "To", to));
  const info = h("p", { class: "muted", "aria-live": "polite" });
  const chartBox = h("div", { class: "chart", id: "chart", role: "img", "aria-label": "Telemetry chart" });
  const chart = new TelemetryChart(chartBox, device.id, (text) => { info.textContent = text; });
  cleanups.push(() => chart.destroy());
  const chosen = new Set();

  function currentRange() {
    const now = Date.now();
    if (rangeSel.value !== "custom") return [now - RANGES[rangeSel.value], now];
    const a = from.value ? new Date(from.value).getTime() : now - RANGES["24h"];
    const b = to.value ? new Date(to.value).getTime() : now;
    return [Math.min(a, b), Math.max(a, b)];
  }
  async function drawChart() {
    const [start, end] = currentRange();
    try {
      await chart.load([...chosen], start, end);
    } catch (error) {
      info.textContent = error.message;
    }
  }
  function drawKeys() {
    const numeric = Object.keys(latest).filter((k) => typeof latest[k].value === "number").sort();
    if (!chosen.size) numeric.slice(0, 4).forEach((k) => chosen.add(k));
    clear(keyBox, h("legend", {}, "Keys"), numeric.length ? numeric.map((k) => {
      const box = h("input", { type: "checkbox", checked: chosen.has(k), value: k });
      box.addEventListener("change", () => { if (box.checked) chosen.add(k); else chosen.delete(k); drawChart(); });
      return h("label", { class: "inline" }, box, k);
    }) : h("span", { class: "muted" }, "no numeric key yet"));
  }
  rangeSel.addEventListener("change", () => { custom.hidden = rangeSel.value !== "custom"; drawChart(); });
  from.addEventListener("change", drawChart);
  to.addEventListener("change", drawChart);

  clear(main, head,
    h("section", { class: "panel", "aria-labelledby": "latest-h" }, h("h2", { id: "latest-h" }, "Latest values"), latestEmpty, latestBox),
    h("section", { class: "panel", "aria-labelledby": "chart-h" }, h("h2", { id: "chart-h" }, "Chart"),
      h("div", { class: "row" }, keyBox, h("label", { for: "range" }, "Range", rangeSel), custom,
        h("button", { type: "button", onclick: drawChart }, "Reset zoom")),
      chartBox, info),
    commandsSection(device, cleanups),
    attributesSection(device),
    alarmsSection(device, cleanups),
    await connectSection(device));

  try {
    Object.assign(latest, await api("GET", `/api/devices/${device.id}/telemetry/latest`));
  } catch (error) {
    latestEmpty.replaceChildren(errorBox(error));
  }
  drawLatest();
  drawKeys();
  await drawChart();

  cleanups.push(subscribe(["telemetry"], device.id, (m) => {
    let newKey = false;
    for (const [key, item] of Object.entries(m.data)) {
      if (!latest[key]) newKey = true;
      if (!latest[key] || item.ts >= latest[key].ts) latest[key] = item;
      chart.push(key, item.ts, item.value);
    }
    drawLatest();
    if (newKey) { drawKeys(); if (!chart.plot) drawChart(); }
  }));
  cleanups.push(subscribe(["device", "connectivity"], device.id, (m) => {
    if (m.type === "device" && m.kind === "deleted") {
      clear(main, h("h1", {}, "Device deleted"), h("a", { href: "#/devices" }, "Back to the devices"));
      return;
    }
    if (m.type === "device") device = m.data;
    else {
      const byKind = { connected: true, disconnected: false }[m.kind];
      device = { ...device, connected: m.data.connected ?? byKind ?? device.connected, last_seen: m.data.last_seen ?? device.last_seen };
    }
    drawHead();
  }));
  return () => cleanups.forEach((fn) => fn());
}

