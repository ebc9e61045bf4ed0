// The cockpit: the task list (polled), the task view (live, see trace.js), and the
// forms that submit tasks and commands as CloudEvents (see api.js).
// Routes: #/ (the list) and #/tasks/<id> (a task).

import { age, h, isTaskId, oneLine, text } from "./dom.js";
import { ApiError, command, config, getJSON, signIn, submitTask, submittedTaskId } from "./api.js";
import { TaskView } from "./trace.js";

const POLL_VISIBLE_MS = 3000;
const POLL_HIDDEN_MS = 30000; // a hidden tab still notices new tasks, just rarely

const $ = (selector) => document.querySelector(selector);
const ui = {
  serverState: $("#server-state"),
  list: $("#task-list"),
  listEmpty: $("#tasks-empty"),
  submitForm: $("#submit-form"),
  submitError: $("#submit-error"),
  taskView: $("#task-view"),
  placeholder: $("#no-task"),
  cancel: $("#tv-cancel"),
  messageForm: $("#tv-message-form"),
  commandResult: $("#tv-command-result"),
  level: $("#tv-level"),
  trace: $("#tv-trace"),
};

let current = null; // the open TaskView
let tasks = [];

// --- the task list -------------------------------------------------------------------

let pollTimer = null;
let polling = false;

async function poll() {
  clearTimeout(pollTimer);
  if (!polling) {
    polling = true;
    try {
      tasks = await getJSON("api/tasks");
      if (!Array.isArray(tasks)) tasks = [];
      setServer("ok", "connected");
      renderList();
    } catch (exc) {
      setServer("down", serverProblem(exc));
    } finally {
      polling = false;
    }
  }
  pollTimer = setTimeout(poll, document.hidden ? POLL_HIDDEN_MS : POLL_VISIBLE_MS);
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) poll(); // back in view: fresh at once
});

function serverProblem(exc) {
  if (!(exc instanceof ApiError) || !exc.status) return "server unreachable";
  if (exc.status === 401) return "no API token: open the cockpit URL `dockyard dev` printed (…/?token=…)";
  return `server error ${exc.status}`;
}

function setServer(state, label) {
  ui.serverState.dataset.state = state;
  text(ui.serverState, label);
}

let listShape = null; // what the list shows apart from the ages: unchanged, only the ages are updated

function renderList() {
  const now = Date.now();
  const open = current?.taskId;
  const shown = tasks.filter((t) => t && isTaskId(t.task_id));
  const shape = JSON.stringify([open, shown.map((t) => [t.task_id, t.state, t.phase, t.outcome, t.finished_at, t.task?.prompt])]);
  ui.listEmpty.hidden = shown.length > 0;
  if (shape === listShape) {
    // Rebuilding would drop keyboard focus and hover every few seconds.
    for (const el of ui.list.querySelectorAll(".task-age")) text(el, age(el.title, now));
  } else {
    listShape = shape;
    ui.list.replaceChildren(...shown.map((t) => taskRow(t, open, now)));
  }
  if (current) {
    const record = shown.find((t) => t.task_id === current.taskId);
    if (record) current.applyRecord(record);
  }
}

function taskRow(t, open, now) {
  const state = String(t.state || "unknown");
  const prompt = t.task && typeof t.task.prompt === "string" ? t.task.prompt : "";
  return h(
    "li",
    {},
    h(
      "a",
      { class: "task-row", href: `#/tasks/${t.task_id}`, dataset: { taskId: t.task_id }, "aria-current": t.task_id === open ? "page" : null },
      h(
        "div",
        { class: "task-row-top" },
        h("span", { class: `badge state-${state}` }, state),
        h("code", { class: "task-id" }, t.task_id),
        t.state === "finished" && t.finished_at
          ? h("span", { class: "task-took", title: `took, ${t.created_at} to ${t.finished_at}` }, age(t.created_at, Date.parse(t.finished_at)))
          : h("span", { class: "task-age", title: t.created_at || "" }, age(t.created_at, now)),
      ),
      prompt ? h("div", { class: "task-prompt" }, oneLine(prompt, 140)) : null,
      h(
        "div",
        { class: "task-row-bottom" },
        t.phase ? h("span", { class: `badge phase-${t.phase}` }, t.phase) : null,
        t.outcome ? h("span", { class: `badge outcome-${t.outcome}` }, t.outcome) : null,
      ),
    ),
  );
}

// --- routing ------------------------------------------------------------------------

function route() {
  const match = /^#\/tasks\/([^/?#]+)$/.exec(location.hash);
  const taskId = match ? decodeURIComponent(match[1]) : null;
  if (current && current.taskId === taskId) return;
  current?.close();
  current = null;
  text(ui.commandResult, "");
  if (taskId && isTaskId(taskId)) {
    ui.taskView.hidden = false;
    ui.placeholder.hidden = true;
    document.body.classList.add("task-open");
    current = new TaskView(ui.taskView, taskId);
    current.start();
    document.title = `${taskId} · dockyard`;
    window.scrollTo(0, 0);
  } else {
    ui.taskView.hidden = true;
    ui.placeholder.hidden = false;
    document.body.classList.remove("task-open");
    text(ui.placeholder, taskId ? `"${taskId}" is not a task id.` : "Pick a task on the left, or submit one.");
    document.title = "dockyard cockpit";
  }
  renderList();
}

window.addEventListener("hashchange", route);

// --- forms ------------------------------------------------------------------------------

function showFormError(el, exc) {
  text(el, exc instanceof ApiError ? exc.describe() : String(exc?.message || exc));
  el.hidden = false;
}

ui.submitForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = ui.submitForm;
  const button = form.querySelector("button[type=submit]");
  const fields = Object.fromEntries(new FormData(form).entries());
  const prompt = String(fields.prompt || "").trim();
  ui.submitError.hidden = true;
  button.disabled = true;
  try {
    const { event, body } = await submitTask({
      prompt,
      repo: String(fields.repo || "").trim(),
      model: String(fields.model || "").trim(),
    });
    const taskId = await submittedTaskId(event, body);
    form.elements.prompt.value = "";
    poll();
    if (taskId) location.hash = `#/tasks/${taskId}`;
  } catch (exc) {
    showFormError(ui.submitError, exc);
  } finally {
    button.disabled = false;
  }
});

async function sendCommand(op, textValue) {
  if (!current) return false;
  const taskId = current.taskId;
  ui.commandResult.className = "command-result";
  text(ui.commandResult, `${op}: sending…`);
  try {
    const { body } = await command(taskId, op, textValue);
    const answer = body?.results?.task_command?.status || (body?.accepted ? "accepted" : "done");
    text(ui.commandResult, `${op}: ${answer}`);
    return true;
  } catch (exc) {
    ui.commandResult.className = "command-result error";
    text(ui.commandResult, `${op}: ${exc instanceof ApiError ? exc.describe() : exc}`);
    return false;
  }
}

ui.cancel.addEventListener("click", async () => {
  ui.cancel.disabled = true;
  try {
    await sendCommand("cancel");
  } finally {
    ui.cancel.disabled = current?.facts.state === "finished"; // the task view keeps controls in step with its state
  }
});

ui.messageForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = ui.messageForm.elements.text;
  const value = input.value.trim();
  if (!value) return;
  if (await sendCommand("message", value)) input.value = "";
});

// The log filter is CSS over data attributes: hidden lines stay in the trace.
ui.level.addEventListener("change", () => {
  ui.trace.dataset.min = ui.level.value;
  try {
    localStorage.setItem("dockyard.logLevel", ui.level.value);
  } catch {
    /* private mode */
  }
});
try {
  const saved = localStorage.getItem("dockyard.logLevel");
  if (saved && [...ui.level.options].some((o) => o.value === saved)) ui.level.value = saved;
} catch {
  /* private mode */
}
ui.trace.dataset.min = ui.level.value;

await signIn(); // ?token= -> the session cookie, before the first API request
config(); // fetched once, early
route();
poll();
