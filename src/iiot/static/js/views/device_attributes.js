import { api, canWrite } from "../api.js";
import { clear, errorBox, fmtTime, fmtValue, h } from "../dom.js";

const SCOPES = [["client", "Client (reported by the device)"], ["shared", "Shared (sent to the device)"], ["server", "Server (kept by the platform)"]];

function parseValue(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text; // plain text is a string value
  }
}

export function attributesSection(device) {
  const box = h("div");
  const section = h("section", { class: "panel", "aria-labelledby": "attrs-h" }, h("h2", { id: "attrs-h" }, "Attributes"), box);
  async function load() {
    let attrs;
    try {
      attrs = await api("GET", `/api/devices/${device.id}/attributes`);
    } catch (error) {
      clear(box, errorBox(error, "Attributes"));
      return;
    }
    clear(box, SCOPES.map(([scope, title]) => {
      const items = Object.entries(attrs[scope] || {}).sort(([a], [b]) => a.localeCompare(b));
      const editable = scope !== "client" && canWrite();
      const err = h("div");
      const part = h("div", { dataset: { scope } }, h("h3", {}, title),
        items.length ? h("table", {}, h("tbody", {}, items.map(([key, item]) => h("tr", {},
          h("td", {}, key), h("td", { class: "num" }, fmtValue(item.value)), h("td", {}, fmtTime(item.ts)),
          editable ? h("td", {}, h("button", { type: "button", "aria-label": `Delete ${scope} attribute ${key}`, onclick: async () => {
            try { await api("DELETE", `/api/devices/${device.id}/attributes/${scope}?keys=${encodeURIComponent(key)}`); await load(); } catch (error) { clear(err, errorBox(error)); }
          } }, "Delete")) : null))))
          : h("p", { class: "muted" }, "none"), err);
      if (editable) {
        const key = h("input", { id: `attr-${scope}-key`, required: true });
        const value = h("input", { id: `attr-${scope}-value`, required: true, placeholder: "42, true, \"text\" or {…}" });
        const form = h("form", { class: "row" }, h("label", { for: `attr-${scope}-key` }, "Key", key),
          h("label", { for: `attr-${scope}-value` }, "Value (JSON or text)", value), h("button", { type: "submit" }, `Set ${scope} attribute`));
        form.addEventListener("submit", async (e) => {
          e.preventDefault();
          try {
            await api("PUT", `/api/devices/${device.id}/attributes/${scope}`, { [key.value]: parseValue(value.value) });
            await load();
          } catch (error) {
            clear(err, errorBox(error));
          }
        });
        part.append(form);
      }
      return part;
    }));
  }
  load();
  return section;
}
