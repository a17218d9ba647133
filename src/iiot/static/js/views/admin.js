import { api, isSysadmin } from "../api.js";
import { clear, dialog, errorBox, fmtTime, h, toast } from "../dom.js";

const ROLES = ["tenant_user", "tenant_admin", "sysadmin"];

export async function render(main) {
  const tenantsBox = h("div");
  const usersBox = h("div");
  const err = h("div", { "aria-live": "polite" });
  clear(main, h("h1", {}, "Administration"), err,
    isSysadmin() ? h("section", { class: "panel", "aria-labelledby": "tenants-h" }, h("h2", { id: "tenants-h" }, "Tenants"), tenantsBox) : null,
    h("section", { class: "panel", "aria-labelledby": "users-h" }, h("h2", { id: "users-h" }, "Users"), usersBox));
  let tenants = [];

  async function run(call, done) {
    try {
      await call();
      toast(done);
      await load();
    } catch (error) {
      clear(err, errorBox(error));
    }
  }

  async function load() {
    clear(err);
    if (isSysadmin()) {
      try {
        tenants = (await api("GET", "/api/tenants?limit=1000")).items;
        clear(tenantsBox,
          h("button", { type: "button", class: "primary", onclick: async () => {
            const v = await dialog("New tenant", [h("label", {}, "Name", h("input", { name: "name", required: true }))], "Create");
            if (v) await run(() => api("POST", "/api/tenants", { name: v.name }), "Tenant created.");
          } }, "Create tenant"),
          h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Retention", "Created", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, tenants.map((t) => h("tr", {}, h("td", {}, t.name), h("td", {}, t.retention_days ? `${t.retention_days} d` : "forever"),
              h("td", {}, fmtTime(t.created_at)),
              h("td", {}, h("div", { class: "row" },
                h("button", { type: "button", "aria-label": `Rename tenant ${t.name}`, onclick: async () => {
                  const v = await dialog(`Rename ${t.name}`, [h("label", {}, "Name", h("input", { name: "name", required: true, value: t.name }))]);
                  if (v) await run(() => api("PATCH", `/api/tenants/${t.id}`, { name: v.name }), "Tenant renamed.");
                } }, "Rename"),
                h("button", { type: "button", class: "danger", "aria-label": `Delete tenant ${t.name}`, onclick: async () => {
                  const ok = await dialog(`Delete tenant ${t.name}?`, [h("p", {}, "Its devices, users and data are deleted. This cannot be undone.")], "Delete", true);
                  if (ok) await run(() => api("DELETE", `/api/tenants/${t.id}`), "Tenant deleted.");
                } }, "Delete"))))))));
      } catch (error) {
        clear(tenantsBox, errorBox(error));
      }
    }
    try {
      const users = (await api("GET", "/api/users?limit=1000")).items;
      const tenantName = Object.fromEntries(tenants.map((t) => [t.id, t.name]));
      clear(usersBox,
        h("button", { type: "button", class: "primary", onclick: createUser }, "Create user"),
        h("table", {}, h("thead", {}, h("tr", {}, ["Username", "Role", isSysadmin() ? "Tenant" : null, "Actions"].filter(Boolean).map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, users.map((u) => h("tr", {}, h("td", {}, u.username), h("td", {}, u.role),
            isSysadmin() ? h("td", {}, u.tenant_id ? (tenantName[u.tenant_id] || u.tenant_id) : "—") : null,
            h("td", {}, h("div", { class: "row" },
              h("button", { type: "button", "aria-label": `Change ${u.username}`, onclick: async () => {
                const v = await dialog(`Change ${u.username}`, [
                  h("label", {}, "Role", h("select", { name: "role" }, roles().map((r) => h("option", { value: r, selected: r === u.role }, r)))),
                  h("label", {}, "New password (empty: unchanged)", h("input", { name: "password", type: "password", autocomplete: "new-password" }))]);
                if (!v) return;
                const body = { role: v.role };
                if (v.password) body.password = v.password;
                await run(() => api("PATCH", `/api/users/${u.id}`, body), "User changed.");
              } }, "Change"),
              h("button", { type: "button", class: "danger", "aria-label": `Delete ${u.username}`, onclick: async () => {
                const ok = await dialog(`Delete user ${u.username}?`, [h("p", {}, "They can no longer log in.")], "Delete", true);
                if (ok) await run(() => api("DELETE", `/api/users/${u.id}`), "User deleted.");
              } }, "Delete"))))))));
    } catch (error) {
      clear(usersBox, errorBox(error));
    }
  }

  function roles() {
    return isSysadmin() ? ROLES : ROLES.slice(0, 2);
  }

  async function createUser() {
    const fields = [h("label", {}, "Username", h("input", { name: "username", required: true, autocomplete: "off" })),
      h("label", {}, "Password (at least 8 characters)", h("input", { name: "password", type: "password", required: true, autocomplete: "new-password" })),
      h("label", {}, "Role", h("select", { name: "role" }, roles().map((r) => h("option", { value: r }, r))))];
    if (isSysadmin()) fields.push(h("label", {}, "Tenant (none for a sysadmin)", h("select", { name: "tenant_id" }, h("option", { value: "" }, "—"), tenants.map((t) => h("option", { value: t.id }, t.name)))));
    const v = await dialog("New user", fields, "Create");
    if (!v) return;
    const body = { username: v.username, password: v.password, role: v.role };
    if (v.tenant_id) body.tenant_id = v.tenant_id;
    await run(() => api("POST", "/api/users", body), "User created.");
  }

  await load();
}
