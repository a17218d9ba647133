import { login, takeLogoutReason } from "../api.js";
import { clear, h } from "../dom.js";

export async function render(main) {
  const reason = takeLogoutReason();
  const err = h("div", { "aria-live": "polite" }, reason ? h("div", { class: "note" }, reason) : null);
  const username = h("input", { name: "username", autocomplete: "username", required: true, id: "username" });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true, id: "password" });
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h("form", {},
    h("label", { for: "username" }, "Username", username),
    h("label", { for: "password" }, "Password", password),
    err, button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    button.disabled = true;
    try {
      await login(username.value, password.value);
      const next = sessionStorage.getItem("iiot.next") || "#/";
      sessionStorage.removeItem("iiot.next");
      const target = next === "#/login" ? "#/" : next;
      if ((location.hash || "#/") === target) window.dispatchEvent(new HashChangeEvent("hashchange"));
      else location.hash = target;
    } catch (error) {
      clear(err, h("div", { class: "error", role: "alert" }, error.message));
      button.disabled = false;
    }
  });
  clear(main, h("section", { class: "login panel" }, h("h1", {}, "Log in to the IIoT platform"), form));
  username.focus();
}
