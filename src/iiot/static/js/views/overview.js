import { api, canWrite } from "../api.js";
import { clear, debounce, errorBox, h } from "../dom.js";
import { subscribe } from "../live.js";

const SEVERITIES = ["CRITICAL", "MAJOR", "MINOR", "WARNING", "INDETERMINATE"];

function card(n, label, cls = "") {
  return h("div", { class: "card" }, h("div", { class: `n ${cls}` }, n), h("div", { class: "l" }, label));
}

export async function render(main) {
  const figures = h("div", { class: "grid", "aria-label": "Devices and ingest" });
  const alarms = h("section", { class: "panel", "aria-labelledby": "alarms-h" });
  const start = h("div");
  clear(main, h("h1", {}, "Overview"), start, figures, alarms);

  async function load() {
    try {
      const o = await api("GET", "/api/overview");
      clear(figures,
        card(o.devices.total, "devices"),
        card(o.devices.active, `active (heard from within ${Math.round(o.inactivity_timeout_s / 60)} min)`, "on"),
        card(o.devices.inactive, "inactive", o.devices.inactive ? "warn" : ""),
        card(o.devices.connected, "connected now"),
        card(o.ingest.points_per_s, "points/s ingested (last minute)"));
      if (o.devices.total === 0) {
        clear(start, h("section", { class: "panel note", "aria-labelledby": "start-h" },
          h("h2", { id: "start-h" }, "Get started"),
          canWrite()
            ? h("p", {}, "No device yet. ", h("a", { href: "#/devices?new=1", class: "button primary" }, "Create your first device"),
              " — the next screen shows its token and the one command that sends its first message.")
            : h("p", {}, "No device yet. Ask a tenant administrator to create one.")));
      } else {
        clear(start);
      }
    } catch (error) {
      clear(figures, errorBox(error));
    }
    try {
      const summary = await api("GET", "/api/alarms/summary");
      const counts = summary.counts || summary;
      clear(alarms, h("h2", { id: "alarms-h" }, "Open alarms"),
        h("div", { class: "grid" }, SEVERITIES.map((s) => card(counts[s] ?? 0, s.toLowerCase(), `sev-${s}`))),
        h("a", { href: "#/alarms" }, "All alarms"));
    } catch (error) {
      clear(alarms, h("h2", { id: "alarms-h" }, "Open alarms"), errorBox(error, "Alarm summary"));
    }
  }
  await load();
  const timer = setInterval(load, 10000);
  const off = subscribe(["alarm", "device"], null, debounce(load, 1000));
  return () => { clearInterval(timer); off(); };
}
