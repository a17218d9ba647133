// The alarm rule model as the API takes it (docs/alarms.md), and plain-words summaries of it.

export const SEVERITIES = ["CRITICAL", "MAJOR", "MINOR", "WARNING", "INDETERMINATE"];

// The API's operators; gt/ge/lt/le compare numbers only, eq/ne also text and true/false.
export const OPS = [
  { op: "gt", symbol: ">", label: "is above" },
  { op: "ge", symbol: "≥", label: "is at least" },
  { op: "lt", symbol: "<", label: "is below" },
  { op: "le", symbol: "≤", label: "is at most" },
  { op: "eq", symbol: "=", label: "equals" },
  { op: "ne", symbol: "≠", label: "differs from" },
];
export const NUMERIC_OPS = new Set(["gt", "ge", "lt", "le"]);

// Duration units of the form; the API takes seconds.
export const UNITS = [
  { unit: "s", seconds: 1, label: "seconds" },
  { unit: "min", seconds: 60, label: "minutes" },
  { unit: "h", seconds: 3600, label: "hours" },
  { unit: "d", seconds: 86400, label: "days" },
];

// Fields the API sets itself: never sent back when a rule is replaced.
const SERVER_FIELDS = ["id", "tenant_id", "created_at", "updated_at"];

export const NEW_RULE = {
  name: "",
  kind: "threshold",
  target: { device_type: "default" },
  key: "",
  severity: "MAJOR",
  create: { op: "gt", value: null, for_s: 0 },
  clear: null,
  enabled: true,
};

export function withoutServerFields(rule) {
  return Object.fromEntries(Object.entries(rule).filter(([k]) => !SERVER_FIELDS.includes(k)));
}

// Seconds as the largest unit that divides them evenly (90 s stays 90 s, 7200 s is 2 h).
export function splitSeconds(seconds) {
  const s = Number(seconds) || 0;
  for (const u of [...UNITS].reverse()) {
    if (s > 0 && s % u.seconds === 0) return { amount: s / u.seconds, unit: u.unit };
  }
  return { amount: s, unit: "s" };
}

export function toSeconds(amount, unit) {
  const factor = (UNITS.find((u) => u.unit === unit) || UNITS[0]).seconds;
  return Math.round(amount * factor * 1000) / 1000; // 0.1 min is 6 s, not 6.000000000000001
}

export function fmtDuration(seconds) {
  const { amount, unit } = splitSeconds(seconds);
  return `${amount} ${unit}`;
}

// The kind of value the form edits: a number, text, or true/false.
export function valueKind(value) {
  if (typeof value === "boolean") return "bool";
  if (typeof value === "string") return "text";
  return "number";
}

function fmtConditionValue(value) {
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}

export function describeCondition(c) {
  const op = OPS.find((o) => o.op === c.op);
  const wait = Number(c.for_s) > 0 ? ` for ${fmtDuration(c.for_s)}` : "";
  return `${op ? op.symbol : c.op} ${fmtConditionValue(c.value)}${wait}`;
}

export function describeTarget(target, deviceNames = {}) {
  if (!target) return "";
  if (target.device_id) return deviceNames[target.device_id] || target.device_id;
  return `every device of type ${target.device_type}`;
}

// "temperature > 80 for 30 s; clears < 75" or "no message for 5 min".
export function describeRule(rule) {
  if (rule.kind === "inactivity") return `no message for ${fmtDuration(rule.timeout_s)}`;
  if (!rule.create) return "";
  const clears = rule.clear ? `clears ${describeCondition(rule.clear)}` : "clears when it no longer holds";
  return `${rule.key} ${describeCondition(rule.create)}; ${clears}`;
}
