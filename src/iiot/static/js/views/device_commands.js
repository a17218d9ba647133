import { api, canWrite } from "../api.js";
import { clear, errorBox, fmtTime, h } from "../dom.js";
import { subscribe } from "../live.js";

const FINAL = new Set(["SUCCESSFUL", "TIMEOUT", "EXPIRED", "FAILED", "CANCELED"]);

export function commandsSection(device, cleanups) {
  const result = h("div", { id: "command-result", "aria-live": "polite" });
  const rows = new Map();
  const body = h("tbody");
  const history = h("div", { class: "table-wrap" });
  const section = h("section", { class: "panel", "aria-labelledby": "commands-h" }, h("h2", { id: "commands-h" }, "Commands"));

  function row(c) {
    return h("tr", { dataset: { id: c.id, status: c.status } },
      h("td", {}, c.method ?? ""), h("td", {}, h("span", { class: c.status === "SUCCESSFUL" ? "on" : FINAL.has(c.status) ? "bad" : "warn" }, c.status)),
      h("td", {}, c.response === undefined || c.response === null ? "" : h("code", {}, JSON.stringify(c.response))),
      h("td", {}, fmtTime(c.created_at ?? c.created_ts ?? null)),
      canWrite() && !FINAL.has(c.status) && c.status !== "DELIVERED"
        ? h("td", {}, h("button", { type: "button", onclick: () => cancel(c) }, "Cancel")) : h("td"));
  }
  function put(c) {
    const merged = { ...(rows.get(c.id) || {}), ...c };
    rows.set(c.id, merged);
    drawHistory();
  }
  function drawHistory() {
    const items = [...rows.values()].sort((a, b) => (b.created_at ?? 0) - (a.created_at ?? 0));
    clear(body, items.map(row));
    clear(history, items.length ? h("table", { id: "commands" },
      h("thead", {}, h("tr", {}, ["Method", "Status", "Response", "Created", ""].map((t) => h("th", { scope: "col" }, t)))), body)
      : h("p", { class: "muted" }, "No command sent yet."));
  }
  async function cancel(c) {
    try {
      put(await api("DELETE", `/api/commands/${c.id}`) || { id: c.id, status: "CANCELED" });
    } catch (error) {
      clear(result, errorBox(error));
    }
  }

  if (canWrite()) {
    const method = h("input", { id: "cmd-method", required: true, placeholder: "setValve" });
    const params = h("textarea", { id: "cmd-params", rows: 2 }, "{}");
    const oneway = h("input", { type: "checkbox", id: "cmd-oneway" });
    const persistent = h("input", { type: "checkbox", id: "cmd-persistent" });
    const timeout = h("input", { type: "number", id: "cmd-timeout", value: "10000", min: "100", step: "100" });
    const send = h("button", { type: "submit", class: "primary" }, "Send");
    const form = h("form", {},
      h("div", { class: "row" }, h("label", { for: "cmd-method" }, "Method", method),
        h("label", { for: "cmd-timeout" }, "Timeout (ms)", timeout),
        h("label", { class: "inline" }, oneway, "one-way"), h("label", { class: "inline" }, persistent, "persistent (waits for an offline device)")),
      h("label", { for: "cmd-params", style: null }, "Params (JSON)", params), h("div", { class: "row" }, send));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      let parsed;
      try {
        parsed = JSON.parse(params.value || "{}");
      } catch (error) {
        clear(result, errorBox(`Params are not valid JSON: ${error.message}`));
        return;
      }
      send.disabled = true;
      clear(result, h("p", { class: "muted" }, "Sending…"));
      try {
        const answer = await api("POST", `/api/devices/${device.id}/commands`, {
          method: method.value, params: parsed, oneway: oneway.checked, persistent: persistent.checked,
          timeout_ms: Number(timeout.value) });
        put({ method: method.value, ...answer });
        clear(result, h("p", {}, `Command ${answer.status ?? "sent"}`,
          answer.response !== undefined && answer.response !== null ? [": ", h("code", {}, JSON.stringify(answer.response))] : ""));
      } catch (error) {
        clear(result, errorBox(error));
      } finally {
        send.disabled = false;
      }
    });
    section.append(form);
  }
  section.append(result, h("h3", {}, "History"), history);
  drawHistory();
  api("GET", `/api/devices/${device.id}/commands?limit=50`)
    .then((page) => { for (const c of page.items || []) put(c); })
    .catch((error) => clear(history, errorBox(error, "Command history")));
  cleanups.push(subscribe(["command"], device.id, (m) => put(m.data)));
  return section;
}
