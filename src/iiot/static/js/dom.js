// Building DOM without innerHTML: text is always text, never markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// An error as the API said it, after what was being done when a context is given.
export function errorBox(error, context) {
  const text = error && error.message ? error.message : String(error);
  return h("div", { class: "error", role: "alert" }, context ? `${context}: ${text}` : text);
}

export function toast(text) {
  const box = document.getElementById("toast");
  const item = h("div", {}, text);
  box.append(item);
  setTimeout(() => item.remove(), 4000);
}

export function fmtTime(ms) {
  if (ms === null || ms === undefined) return "never";
  const d = new Date(ms);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function ago(ms) {
  if (ms === null || ms === undefined) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function fmtValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Math.round(v * 1e6) / 1e6);
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

export function copyBlock(text, label) {
  const pre = h("pre", {}, text);
  const button = h("button", { type: "button", "aria-label": `Copy ${label}` }, "Copy");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      // No clipboard permission (plain HTTP): select the text for Ctrl+C instead.
      const range = document.createRange();
      range.selectNodeContents(pre);
      const sel = getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });
  return h("div", { class: "copy" }, pre, button);
}

// A modal dialog; resolves with the submitted form's values, or null when cancelled.
export function dialog(title, fields, submitLabel = "Save", danger = false) {
  return new Promise((resolve) => {
    const form = h("form", { method: "dialog" });
    const err = h("div");
    form.append(h("h2", {}, title), ...fields, err,
      h("div", { class: "row" },
        h("button", { type: "submit", class: danger ? "danger" : "primary", value: "ok" }, submitLabel),
        h("button", { type: "button", onclick: () => { dlg.close(); } }, "Cancel")));
    const dlg = h("dialog", {}, form);
    let result = null;
    form.addEventListener("submit", (e) => {
      result = Object.fromEntries(new FormData(form).entries());
      if (e.submitter && e.submitter.value !== "ok") result = null;
    });
    dlg.addEventListener("close", () => { dlg.remove(); resolve(result); });
    document.body.append(dlg);
    dlg.showModal();
  });
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
