// Telemetry chart: uPlot, at most ~2,000 points per key per request, gaps drawn as gaps.
import uPlot from "../vendor/uplot/uPlot.esm.js";
import { api } from "./api.js";

export const MAX_POINTS = 2000;
const STEPS = [
  ["1s", 1e3], ["2s", 2e3], ["5s", 5e3], ["10s", 1e4], ["15s", 15e3], ["30s", 3e4],
  ["1m", 6e4], ["2m", 12e4], ["5m", 3e5], ["10m", 6e5], ["15m", 9e5], ["30m", 18e5],
  ["1h", 36e5], ["2h", 72e5], ["3h", 108e5], ["6h", 216e5], ["12h", 432e5], ["1d", 864e5], ["1w", 6048e5],
];
const COLORS = ["#0b5fd0", "#d4580d", "#177245", "#9b30d0", "#b3261e", "#00838f", "#6d4c41", "#c2185b"];

// The smallest bucket that keeps a span within MAX_POINTS buckets.
export function intervalFor(spanMs) {
  for (const [name, ms] of STEPS) if (spanMs / ms <= MAX_POINTS) return [name, ms];
  return STEPS[STEPS.length - 1];
}

// Aligned columns for uPlot; a null after any silence longer than two buckets breaks the line.
export function align(series, keys, stepMs) {
  const stamps = new Set();
  for (const key of keys) for (const p of series[key] || []) stamps.add(p.ts);
  const xs = [...stamps].sort((a, b) => a - b);
  const withGaps = [];
  const gaps = [];
  for (let i = 0; i < xs.length; i++) {
    if (i > 0 && xs[i] - xs[i - 1] > 2 * stepMs) {
      gaps.push(withGaps.length);
      withGaps.push(xs[i - 1] + stepMs);
    }
    withGaps.push(xs[i]);
  }
  const index = new Map(withGaps.map((ts, i) => [ts, i]));
  const columns = keys.map((key) => {
    // undefined: this key has no point at a stamp another key has (uPlot joins across it);
    // null: nothing for a while (uPlot breaks the line there).
    const col = new Array(withGaps.length).fill(undefined);
    for (const g of gaps) col[g] = null;
    for (const p of series[key] || []) if (typeof p.value === "number") col[index.get(p.ts)] = p.value;
    return col;
  });
  return [withGaps.map((ts) => ts / 1000), ...columns];
}

export class TelemetryChart {
  constructor(container, deviceId, onInfo) {
    this.container = container;
    this.deviceId = deviceId;
    this.onInfo = onInfo;
    this.plot = null;
    this.keys = [];
    this.range = null;
    this.seq = 0;
    this.resize = () => this.plot && this.plot.setSize(this.size());
    window.addEventListener("resize", this.resize);
  }

  size() {
    return { width: Math.max(280, this.container.clientWidth - 4), height: 320 };
  }

  async load(keys, start, end) {
    this.keys = keys;
    this.range = [start, end];
    const seq = ++this.seq;
    if (!keys.length) {
      this.destroyPlot();
      this.onInfo("Choose at least one numeric key.");
      return;
    }
    const [interval, stepMs] = intervalFor(end - start);
    const q = new URLSearchParams({ keys: keys.join(","), start: String(Math.floor(start)), end: String(Math.ceil(end)),
      agg: "avg", interval, limit: String(MAX_POINTS) });
    const series = await api("GET", `/api/devices/${this.deviceId}/telemetry?${q}`);
    if (seq !== this.seq) return; // a newer range was asked for meanwhile
    const data = align(series, keys, stepMs);
    const count = keys.reduce((n, k) => n + (series[k] || []).length, 0);
    this.draw(keys, data, start, end);
    this.container.dataset.points = String(count);
    this.container.dataset.interval = interval;
    this.onInfo(`${count} points, averaged per ${interval}. Drag across the chart to zoom in.`);
  }

  destroyPlot() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }

  draw(keys, data, start, end) {
    this.destroyPlot();
    const dark = matchMedia("(prefers-color-scheme: dark)").matches;
    const axis = { stroke: dark ? "#c9d1d9" : "#1b1f24", grid: { stroke: dark ? "#2b323a" : "#e4e7eb" }, ticks: { stroke: dark ? "#2b323a" : "#e4e7eb" } };
    const opts = {
      ...this.size(),
      scales: { x: { time: true, min: start / 1000, max: end / 1000 } },
      // Each key on its own scale (temperature and pressure differ by orders of magnitude);
      // the first two keys get an axis, left and right, in their colour.
      axes: [axis, ...keys.slice(0, 2).map((key, i) => ({ ...axis, scale: key, side: i ? 1 : 3,
        stroke: COLORS[i], grid: i ? { show: false } : axis.grid }))],
      series: [{}, ...keys.map((key, i) => ({ label: key, scale: key, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
      cursor: { drag: { x: true, y: false, setScale: false } },
      hooks: {
        setSelect: [(u) => {
          if (u.select.width < 5) return;
          const from = u.posToVal(u.select.left, "x") * 1000;
          const to = u.posToVal(u.select.left + u.select.width, "x") * 1000;
          u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
          // Zooming asks the API again: a narrower span gets finer buckets.
          this.load(this.keys, from, to).catch((e) => this.onInfo(e.message));
        }],
      },
    };
    this.plot = new uPlot(opts, data, this.container);
    this.container.dataset.drawn = String(Date.now());
    performance.mark("iiot:chart-drawn"); // navigation-to-drawn, read by bench/bench_console.py
  }

  // A live value: appended when it falls inside the shown range.
  push(key, ts, value) {
    if (!this.plot || !this.range || typeof value !== "number") return;
    const col = this.keys.indexOf(key);
    if (col < 0 || ts < this.range[0]) return;
    const data = this.plot.data.map((c) => Array.from(c));
    data[0].push(ts / 1000);
    data.forEach((c, i) => { if (i > 0) c.push(i === col + 1 ? value : undefined); });
    if (ts > this.range[1]) this.range[1] = ts;
    this.plot.setData(data, false);
    this.plot.setScale("x", { min: this.range[0] / 1000, max: this.range[1] / 1000 });
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    this.destroyPlot();
  }
}
