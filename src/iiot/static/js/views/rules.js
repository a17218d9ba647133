import { api } from "../api.js";
import { clear, errorBox, h, toast } from "../dom.js";

const EXAMPLE = {
  name: "Overheating",
  target: { device_type: "default" },
  key: "temperature",
  severity: "MAJOR",
  create: { op: "gt", value: 80, for_s: 0 },
  clear: { op: "lt", value: 75, for_s: 0 },
  enabled: true,
};

// Rules as JSON, as the API takes them: its validation messages are shown word for word.
export async function render(main) {
  const list = h("div", { class: "table-wrap" });
  const editor = h("textarea", { id: "rule-json", rows: 12 }, JSON.stringify(EXAMPLE, null, 2));
  const err = h("div", { "aria-live": "polite" });
  let editing = null;
  const title = h("h2", { id: "rule-h" }, "New rule");
  const save = h("button", { type: "submit", class: "primary" }, "Save rule");
  const form = h("form", {}, h("label", { for: "rule-json" }, "Rule (JSON)", editor), err,
    h("div", { class: "row" }, save, h("button", { type: "button", onclick: () => edit(null) }, "New")));
  clear(main, h("h1", {}, "Rules"), list, h("section", { class: "panel", "aria-labelledby": "rule-h" }, title, form));

  function edit(rule) {
    editing = rule ? rule.id : null;
    title.textContent = rule ? `Edit rule ${rule.name}` : "New rule";
    const body = rule ? Object.fromEntries(Object.entries(rule).filter(([k]) => !["id", "tenant_id", "created_at", "updated_at"].includes(k))) : EXAMPLE;
    editor.value = JSON.stringify(body, null, 2);
    clear(err);
    editor.focus();
  }
  async function load() {
    try {
      const page = await api("GET", "/api/rules?limit=500");
      const items = page.items || [];
      clear(list, items.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Key", "Severity", "Enabled", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, items.map((r) => h("tr", { dataset: { id: r.id } }, h("td", {}, r.name), h("td", {}, r.key ?? r.kind ?? ""),
          h("td", {}, h("span", { class: `sev-${r.severity}` }, r.severity)), h("td", {}, r.enabled === false ? "no" : "yes"),
          h("td", {}, h("div", { class: "row" }, h("button", { type: "button", onclick: () => edit(r), "aria-label": `Edit ${r.name}` }, "Edit"),
            h("button", { type: "button", class: "danger", "aria-label": `Delete ${r.name}`, onclick: async () => {
              try { await api("DELETE", `/api/rules/${r.id}`); toast("Rule deleted."); await load(); } catch (error) { clear(err, errorBox(error)); }
            } }, "Delete")))))))
        : h("p", { class: "muted" }, "No rule yet: write one below."));
    } catch (error) {
      clear(list, errorBox(error, "Rules"));
    }
  }
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let body;
    try {
      body = JSON.parse(editor.value);
    } catch (error) {
      clear(err, errorBox(`Not valid JSON: ${error.message}`));
      return;
    }
    try {
      await api(editing ? "PUT" : "POST", editing ? `/api/rules/${editing}` : "/api/rules", body);
      toast("Rule saved.");
      edit(null);
      await load();
    } catch (error) {
      clear(err, errorBox(error));
    }
  });
  await load();
}
