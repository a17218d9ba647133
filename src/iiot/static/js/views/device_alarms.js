import { api } from "../api.js";
import { clear, debounce, errorBox, h } from "../dom.js";
import { subscribe } from "../live.js";
import { alarmTable } from "./alarms.js";

export function alarmsSection(device, cleanups) {
  const box = h("div");
  const section = h("section", { class: "panel", "aria-labelledby": "dev-alarms-h" }, h("h2", { id: "dev-alarms-h" }, "Alarms"), box);
  async function load() {
    try {
      const page = await api("GET", `/api/alarms?device_id=${device.id}&limit=50`);
      clear(box, alarmTable(page.items || [], load, false));
    } catch (error) {
      clear(box, errorBox(error, "The device's alarms"));
    }
  }
  load();
  cleanups.push(subscribe(["alarm"], device.id, debounce(load, 300)));
  return section;
}
