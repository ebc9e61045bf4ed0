// Talking to the server: the task listings, and CloudEvents to the broker ingress.
// Paths are relative to the page, so the cockpit also works behind a path prefix.

export const EVENT_TASK_SUBMITTED = "dev.dockyard.task.submitted";
export const EVENT_TASK_COMMAND = "dev.dockyard.task.command";
export const EVENT_SOURCE = "dockyard/cockpit";

let configPromise = null;

// The token flow (as Jupyter's): `dockyard dev` prints the cockpit URL with ?token=. The page trades
// it once for an HttpOnly, SameSite=Strict cookie (POST api/session) and drops it from the address
// bar and history; the cookie then authenticates every request, EventSource included.
export async function signIn() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (!token) return false;
  params.delete("token");
  const query = params.toString();
  history.replaceState(history.state, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
  try {
    const response = await fetch("api/session", { method: "POST", cache: "no-store", headers: { Authorization: `Bearer ${token}` } });
    return response.ok;
  } catch {
    return false;
  }
}

// {ingress}: "/" under `dockyard dev`, "/api/events" (a relay) in the cluster; and what the form
// and the list's filters need: {providers, states, outcomes, limits} (functions/stream/cockpit/__init__.py).
// Without it the page still works: the server judges every field anyway.
export function config() {
  configPromise ??= fetch("cockpit-config.json", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : {}))
    .catch(() => ({}))
    .then((c) => ({
      ingress: typeof c.ingress === "string" && c.ingress ? c.ingress : "/",
      providers: strings(c.providers),
      states: strings(c.states),
      outcomes: strings(c.outcomes),
      limits: c.limits && typeof c.limits === "object" ? c.limits : {},
    }));
  return configPromise;
}

function strings(value) {
  return Array.isArray(value) ? value.filter((v) => typeof v === "string" && v) : [];
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && typeof body.error === "string" ? body.error : `the server answered ${status}`;
    super(error);
    this.status = status;
    this.field = body && typeof body.field === "string" ? body.field : null;
  }

  // "prompt is required ... (field: prompt)"
  describe() {
    const status = this.status ? `${this.status}: ` : "";
    return `${status}${this.message}${this.field ? ` (field: ${this.field})` : ""}`;
  }
}

async function answer(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export async function getJSON(path) {
  let response;
  try {
    response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
  } catch (exc) {
    throw new ApiError(0, { error: `the server is unreachable (${exc.message || exc})` });
  }
  return answer(response);
}

// crypto.randomUUID exists only in secure contexts (https, localhost); a cluster URL
// such as http://stream.dockyard.<ip>.sslip.io is not one.
export function uuid() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// One structured CloudEvent to the ingress; the answer's JSON body, or ApiError.
export async function sendEvent(type, data) {
  const { ingress } = await config();
  const event = { specversion: "1.0", type, source: EVENT_SOURCE, id: uuid(), datacontenttype: "application/json", data };
  let response;
  try {
    response = await fetch(ingress, {
      method: "POST",
      headers: { "Content-Type": "application/cloudevents+json", Accept: "application/json" },
      body: JSON.stringify(event),
    });
  } catch (exc) {
    throw new ApiError(0, { error: `the broker ingress ${ingress} is unreachable (${exc.message || exc})` });
  }
  return { event, body: (await answer(response)) || {} };
}

// The task id the functions chose: the dev ingress reports the function's answer,
// the relay reports it directly; otherwise it is derived the way task_submitted does.
export async function submittedTaskId(event, body) {
  const given = body?.task_id ?? body?.results?.task_submitted?.task_id ?? event.data.task_id;
  if (typeof given === "string" && given) return given;
  if (!globalThis.crypto?.subtle) return null;
  const bytes = new TextEncoder().encode(`${event.source}\u0000${event.id}`);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return "t-" + [...digest.slice(0, 8)].map((x) => x.toString(16).padStart(2, "0")).join("");
}

// The data of a task.submitted event from the form's values; empty values are left out (server defaults).
export function submitTask({ prompt, repo, ref, model, deadline, retries, taskId }) {
  const data = { prompt };
  if (repo) data.repo = ref ? { url: repo, ref } : { url: repo };
  if (model) data.model = model;
  const limits = {};
  if (deadline !== null && deadline !== undefined) limits.deadline_seconds = deadline;
  if (retries !== null && retries !== undefined) limits.retries = retries;
  if (Object.keys(limits).length) data.limits = limits;
  if (taskId) data.task_id = taskId;
  return sendEvent(EVENT_TASK_SUBMITTED, data);
}

export function command(taskId, op, text) {
  const data = { task_id: taskId, op };
  if (text !== undefined) data.text = text;
  return sendEvent(EVENT_TASK_COMMAND, data);
}
