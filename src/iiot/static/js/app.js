// The console shell: session, navigation by role, and the hash router.
import { canWrite, currentSession, logout, onSession } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import { connectLive, disconnectLive, onLiveStatus } from "./live.js";
import * as loginView from "./views/login.js";
import * as overviewView from "./views/overview.js";
import * as devicesView from "./views/devices.js";
import * as deviceView from "./views/device.js";
import * as alarmsView from "./views/alarms.js";
import * as rulesView from "./views/rules.js";
import * as adminView from "./views/admin.js";

const main = document.getElementById("main");
const top = document.getElementById("top");
let cleanup = null;
let liveToken = null;

const routes = [
  { path: /^#\/?$/, view: overviewView, nav: "#/" },
  { path: /^#\/devices\/?(\?.*)?$/, view: devicesView, nav: "#/devices" },
  { path: /^#\/devices\/([^/?]+)$/, view: deviceView, nav: "#/devices" },
  { path: /^#\/alarms\/?$/, view: alarmsView, nav: "#/alarms" },
  { path: /^#\/rules\/?$/, view: rulesView, nav: "#/rules" }, // read-only for tenant users
  { path: /^#\/admin\/?$/, view: adminView, nav: "#/admin", allowed: canWrite },
];

function renderHeader() {
  const s = currentSession();
  if (!s || !s.user) {
    top.hidden = true;
    return;
  }
  const links = [
    ["#/", "Overview"],
    ["#/devices", "Devices"],
    ["#/alarms", "Alarms"],
    ["#/rules", "Rules"],
  ];
  if (canWrite()) links.push(["#/admin", "Administration"]);
  const dot = h("span", { class: "live-dot", title: "live updates" });
  onLiveStatus((up) => {
    dot.classList.toggle("up", up);
    dot.title = up ? "live updates on" : "live updates reconnecting";
  });
  clear(top,
    h("span", { class: "brand" }, "IIoT"),
    h("nav", { "aria-label": "Main" }, links.map(([href, text]) => h("a", { href, "data-nav": href }, text))),
    h("span", { class: "who" }, dot, `${s.user.username} (${s.user.role})`),
    h("a", { href: "/docs", class: "button" }, "API docs"),
    h("button", { type: "button", onclick: () => logout() }, "Log out"));
  top.hidden = false;
}

function markNav(nav) {
  for (const a of top.querySelectorAll("nav a")) {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function route() {
  if (cleanup) {
    try { cleanup(); } catch (e) { console.warn(e); }
    cleanup = null;
  }
  const hash = location.hash || "#/";
  const s = currentSession();
  if (!s || !s.user) {
    disconnectLive();
    liveToken = null;
    top.hidden = true;
    if (hash !== "#/login") sessionStorage.setItem("iiot.next", hash);
    cleanup = await loginView.render(main);
    return;
  }
  if (hash === "#/login") {
    location.hash = "#/";
    return;
  }
  if (liveToken !== s.token) {
    liveToken = s.token;
    connectLive(s.token);
    renderHeader();
  }
  for (const r of routes) {
    const match = hash.match(r.path);
    if (!match) continue;
    markNav(r.nav);
    if (r.allowed && !r.allowed()) break;
    clear(main, h("p", { class: "muted" }, "Loading…"));
    try {
      cleanup = (await r.view.render(main, match.slice(1))) || null;
    } catch (error) {
      clear(main, errorBox(error));
    }
    main.focus({ preventScroll: true });
    return;
  }
  clear(main, h("h1", {}, "Not found"), h("p", {}, "This page does not exist. "), h("a", { href: "#/" }, "Go to the overview"));
}

onSession((s) => {
  if (!s) {
    disconnectLive();
    liveToken = null;
  }
});
window.addEventListener("hashchange", route);
route();
