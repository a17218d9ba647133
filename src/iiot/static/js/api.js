// The public REST API, with the session's bearer token; errors carry the API's own words.

const KEY = "iiot.session";
let session = null;
let expiryTimer = null;
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export function currentSession() {
  if (session) return session;
  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) || "null");
    if (saved && saved.expiresAt > Date.now()) setSession(saved);
  } catch {
    sessionStorage.removeItem(KEY);
  }
  return session;
}

function setSession(value) {
  session = value;
  clearTimeout(expiryTimer);
  if (value) {
    sessionStorage.setItem(KEY, JSON.stringify(value));
    scheduleExpiry(value);
  } else {
    sessionStorage.removeItem(KEY);
  }
  for (const fn of listeners) fn(session);
}

// The session ends exactly when the access token does (re-armed: timers hold at most ~24.8 days).
function scheduleExpiry(value) {
  const left = value.expiresAt - Date.now();
  expiryTimer = setTimeout(() => {
    if (session !== value) return;
    if (Date.now() >= value.expiresAt) logout("Your session expired: log in again.");
    else scheduleExpiry(value);
  }, Math.max(0, Math.min(left, 2 ** 31 - 1)));
}

export function onSession(fn) {
  listeners.add(fn);
}

export async function login(username, password) {
  const answer = await request("POST", "/api/auth/login", { username, password }, false);
  const expiresAt = Date.now() + answer.expires_in * 1000;
  setSession({ token: answer.access_token, expiresAt, user: null });
  const user = await api("GET", "/api/auth/me");
  setSession({ token: answer.access_token, expiresAt, user });
  return user;
}

export function logout(reason) {
  setSession(null);
  if (reason) sessionStorage.setItem("iiot.reason", reason);
  location.hash = "#/login";
}

export function takeLogoutReason() {
  const reason = sessionStorage.getItem("iiot.reason");
  sessionStorage.removeItem("iiot.reason");
  return reason;
}

export function api(method, path, body) {
  return request(method, path, body, true);
}

async function request(method, path, body, authenticated) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (authenticated && session) headers.Authorization = `Bearer ${session.token}`;
  let answer;
  try {
    answer = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, `The platform cannot be reached (${error.message}).`);
  }
  const text = await answer.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { detail: text };
    }
  }
  if (!answer.ok) {
    const detail = data && typeof data.detail === "string" ? data.detail : `${answer.status} ${answer.statusText}`;
    if (answer.status === 401 && authenticated && session) logout(detail);
    throw new ApiError(answer.status, detail);
  }
  return data;
}

export function role() {
  return session && session.user ? session.user.role : null;
}

export const canWrite = () => role() === "sysadmin" || role() === "tenant_admin";
export const isSysadmin = () => role() === "sysadmin";
