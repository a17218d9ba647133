// The live channel: one WebSocket per page load, re-connected and re-subscribed after a drop.

let socket = null;
let token = null;
let retry = 500;
let ready = false;
const subscriptions = new Map(); // id -> {topics, deviceId, handler}
let nextId = 1;
const statusListeners = new Set();

export function onLiveStatus(fn) {
  statusListeners.add(fn);
  fn(ready);
  return () => statusListeners.delete(fn);
}

function setReady(value) {
  ready = value;
  for (const fn of statusListeners) fn(value);
}

export function connectLive(accessToken) {
  token = accessToken;
  if (socket) socket.close();
  open();
}

export function disconnectLive() {
  token = null;
  subscriptions.clear();
  if (socket) socket.close();
  socket = null;
  setReady(false);
}

function open() {
  if (!token) return;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/ws`;
  const ws = new WebSocket(url);
  socket = ws;
  // The token travels in the first message, never in the URL (URLs end up in logs).
  ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "auth", token })));
  // Each frame is an array of messages: everything that waited since the server's last flush.
  ws.addEventListener("message", (event) => {
    for (const message of JSON.parse(event.data)) dispatch(message);
  });
  ws.addEventListener("close", (event) => {
    if (socket !== ws) return;
    setReady(false);
    if (event.code === 4401 || !token) return; // the session ends: api.js sends us to login
    setTimeout(open, retry);
    retry = Math.min(retry * 2, 10000);
  });
}

function dispatch(message) {
  if (message.type === "ready") {
    retry = 500;
    setReady(true);
    for (const sub of subscriptions.values()) send(sub, "subscribe");
    return;
  }
  for (const sub of subscriptions.values()) {
    if (!sub.topics.includes(message.type)) continue;
    if (sub.deviceId && message.device_id !== sub.deviceId) continue;
    sub.handler(message);
  }
}

function send(sub, type) {
  if (socket && socket.readyState === WebSocket.OPEN && ready) {
    socket.send(JSON.stringify({ type, topics: sub.topics, device_id: sub.deviceId || null }));
  }
}

// Calls handler(message) for each event of these topics (one device, or all when deviceId is null).
export function subscribe(topics, deviceId, handler) {
  const sub = { topics, deviceId, handler };
  const id = nextId++;
  subscriptions.set(id, sub);
  send(sub, "subscribe");
  return () => {
    subscriptions.delete(id);
    const stillWanted = [...subscriptions.values()].some(
      (s) => s.deviceId === deviceId && topics.every((t) => s.topics.includes(t)));
    if (!stillWanted) send(sub, "unsubscribe");
  };
}
