// The cockpit: the task list (polled, see tasklist.js), the task view (live, see trace.js), and the
// forms that submit tasks (submitform.js) and commands as CloudEvents (see api.js).
// Routes: #/ (the list) and #/tasks/<id> (a task).

import { isTaskId, text } from "./dom.js";
import { ApiError, command, config, getJSON, signIn } from "./api.js";
import { TaskView } from "./trace.js";
import { TaskList } from "./tasklist.js";
import { SubmitForm } from "./submitform.js";

const POLL_VISIBLE_MS = 3000;
const POLL_HIDDEN_MS = 30000; // a hidden tab still notices new tasks, just rarely

const $ = (selector) => document.querySelector(selector);
const ui = {
  serverState: $("#server-state"),
  taskView: $("#task-view"),
  placeholder: $("#no-task"),
  cancel: $("#tv-cancel"),
  messageForm: $("#tv-message-form"),
  commandResult: $("#tv-command-result"),
  level: $("#tv-level"),
  trace: $("#tv-trace"),
};

let current = null; // the open TaskView

const taskList = new TaskList({
  list: $("#task-list"),
  empty: $("#tasks-empty"),
  count: $("#tasks-count"),
  search: $("#filter-text"),
  state: $("#filter-state"),
  outcome: $("#filter-outcome"),
});

const submitForm = new SubmitForm(
  { details: $("#new-task"), form: $("#submit-form"), error: $("#submit-error"), opener: $("#new-task-open") },
  {
    onSubmitted(taskId) {
      poll();
      if (taskId) location.hash = `#/tasks/${taskId}`;
    },
  },
);

// --- the task list -------------------------------------------------------------------

let pollTimer = null;
let polling = false;
let firstList = true;

async function poll() {
  clearTimeout(pollTimer);
  if (!polling) {
    polling = true;
    try {
      const tasks = await getJSON("api/tasks");
      setServer("ok", "connected");
      taskList.update(Array.isArray(tasks) ? tasks : []);
      if (firstList && !tasks?.length && !current) submitForm.details.open = true; // nothing to show yet: the form is what comes next
      firstList = false;
      if (current) {
        const record = taskList.record(current.taskId);
        if (record) current.applyRecord(record);
      }
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
    const record = taskList.record(taskId);
    if (record) current.applyRecord(record);
  } else {
    ui.taskView.hidden = true;
    ui.placeholder.hidden = false;
    document.body.classList.remove("task-open");
    text(ui.placeholder, taskId ? `"${taskId}" is not a task id.` : "Pick a task on the left, or submit one.");
    document.title = "dockyard cockpit";
  }
  taskList.setOpen(current?.taskId ?? null);
}

window.addEventListener("hashchange", route);

// The skip link moves the focus to the main content without going through the router (#main is no route).
$(".skip-link").addEventListener("click", (e) => {
  e.preventDefault();
  const main = $("#main");
  main.focus();
  main.scrollIntoView();
});

// --- commands on the open task --------------------------------------------------------

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
config().then((c) => {
  taskList.offer(c);
  submitForm.offer(c);
});
route();
poll();
