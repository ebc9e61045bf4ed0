// The task list: one row per task, kept by task id and updated in place.
//
// Invariants:
// - A row is created once per task id and never rebuilt: a change of state changes
//   the row's text and classes, so keyboard focus, hover and the list's scroll
//   position stay where they were (a rebuild would drop them every few seconds).
// - Rows are only moved when the order of the tasks changes; a new task is inserted
//   before the existing rows without moving them (moving a focused node blurs it).
// - The filters hide rows (`hidden`), they never remove them; a row that holds the
//   keyboard focus stays shown until the focus leaves it, even if it no longer matches.
// - Times: a finished task shows how long it ran (finished − started), a running one
//   the time since it started, a queued one how long it has waited; none grows once finished.

import { age, duration, h, isTaskId, oneLine, text } from "./dom.js";

const TICK_MS = 1000;

export class TaskList {
  constructor({ list, empty, count, search, state, outcome }) {
    this.el = { list, empty, count, search, state, outcome };
    this.rows = new Map(); // task id -> {li, link, state, outcome, phase, time, prompt, reason, record}
    this.order = []; // task ids, as the server lists them (newest first)
    this.open = null; // the task shown beside the list
    this.ticker = null;
    for (const control of [search, state, outcome]) control.addEventListener("input", () => this.applyFilters());
    // A row kept shown for its focus is hidden once the focus has gone elsewhere.
    list.addEventListener("focusout", () => queueMicrotask(() => this.applyFilters()));
  }

  // The filters' choices: the states and outcomes the server knows (cockpit-config.json).
  offer({ states, outcomes }) {
    fill(this.el.state, states);
    fill(this.el.outcome, outcomes);
  }

  setOpen(taskId) {
    this.open = taskId;
    for (const [id, row] of this.rows) {
      if (id === taskId) row.link.setAttribute("aria-current", "page");
      else row.link.removeAttribute("aria-current");
    }
  }

  // The server's list of records: rows are added, updated and removed by task id.
  update(records) {
    const shown = records.filter((t) => t && typeof t === "object" && isTaskId(t.task_id));
    const ids = shown.map((t) => t.task_id);
    const wanted = new Set(ids);
    for (const [id, row] of this.rows) {
      if (!wanted.has(id)) {
        row.li.remove();
        this.rows.delete(id);
      }
    }
    for (const record of shown) {
      let row = this.rows.get(record.task_id);
      if (!row) {
        row = this.createRow(record.task_id);
        this.rows.set(record.task_id, row);
      }
      this.fillRow(row, record);
    }
    this.order = ids;
    this.arrange();
    this.applyFilters();
    this.tick();
  }

  record(taskId) {
    return this.rows.get(taskId)?.record ?? null;
  }

  // Put the rows in the server's order, moving only those out of place.
  arrange() {
    const { list } = this.el;
    let cursor = list.firstElementChild;
    for (const id of this.order) {
      const li = this.rows.get(id).li;
      if (li === cursor) {
        cursor = cursor.nextElementSibling;
      } else {
        list.insertBefore(li, cursor); // a new row, or one that moved
      }
    }
  }

  applyFilters() {
    const needle = this.el.search.value.trim().toLowerCase();
    const state = this.el.state.value;
    const outcome = this.el.outcome.value;
    const focused = document.activeElement;
    let visible = 0;
    for (const row of this.rows.values()) {
      const r = row.record;
      const prompt = typeof r.task?.prompt === "string" ? r.task.prompt : "";
      const matches =
        (!needle || r.task_id.toLowerCase().includes(needle) || prompt.toLowerCase().includes(needle)) &&
        (!state || r.state === state) &&
        (!outcome || r.outcome === outcome);
      const show = matches || row.li.contains(focused);
      if (row.li.hidden === show) row.li.hidden = !show;
      if (show) visible += 1;
    }
    const total = this.rows.size;
    this.el.empty.hidden = visible > 0;
    text(this.el.empty, total ? "No task matches the filters." : "No tasks yet.");
    const counted = total === visible ? `${total} task${total === 1 ? "" : "s"}` : `${visible} of ${total} shown`;
    if (this.el.count.textContent !== counted) text(this.el.count, counted); // a status region: said only when it changes
  }

  createRow(taskId) {
    const row = {
      state: h("span", { class: "badge" }),
      outcome: h("span", { class: "badge", hidden: true }),
      phase: h("span", { class: "badge", hidden: true }),
      time: h("span", { class: "task-time" }),
      prompt: h("span", { class: "task-prompt" }),
      reason: h("span", { class: "task-reason", hidden: true }),
      record: null,
    };
    row.link = h(
      "a",
      { class: "task-row", href: `#/tasks/${taskId}`, dataset: { taskId } },
      h("span", { class: "task-row-top" }, row.state, row.outcome, h("code", { class: "task-id" }, taskId), row.time),
      row.prompt,
      h("span", { class: "task-row-bottom" }, row.phase, row.reason),
    );
    if (taskId === this.open) row.link.setAttribute("aria-current", "page");
    row.li = h("li", {}, row.link);
    return row;
  }

  fillRow(row, record) {
    row.record = record;
    const state = String(record.state || "unknown");
    const finished = state === "finished";
    badge(row.state, `badge state-${state}`, finished && record.outcome ? null : state); // the outcome says it
    badge(row.outcome, `badge outcome-${record.outcome}`, record.outcome);
    badge(row.phase, `badge phase-${record.phase}`, finished ? null : record.phase); // a finished task's phase says nothing more
    const prompt = typeof record.task?.prompt === "string" ? record.task.prompt : "";
    setText(row.prompt, oneLine(prompt, 140));
    row.prompt.hidden = !prompt;
    const reason = finished && record.outcome !== "done" && typeof record.reason === "string" ? record.reason : "";
    setText(row.reason, reason ? oneLine(reason, 160) : "");
    row.reason.hidden = !reason;
    if (reason) row.reason.title = reason;
    else row.reason.removeAttribute("title");
  }

  // The times of every row; while a task is unfinished, again every second.
  tick() {
    clearTimeout(this.ticker);
    const now = Date.now();
    let live = false;
    for (const row of this.rows.values()) live = setTime(row.time, row.record, now) || live;
    if (live) this.ticker = setTimeout(() => this.tick(), TICK_MS);
  }
}

function fill(select, values) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const value of values) if (!have.has(value)) select.append(h("option", { value }, value.replaceAll("_", " ")));
}

function setText(el, value) {
  if (el.textContent !== value) text(el, value);
}

function badge(el, className, value) {
  el.hidden = !value;
  if (!value) return;
  if (el.className !== className) el.className = className;
  setText(el, String(value));
}

// The time a row shows; true while it still changes (the task is not finished).
function setTime(el, record, now) {
  const started = record.started_at || record.created_at; // started_at: the first start (older records lack it)
  let kind;
  let value;
  let title;
  if (record.state === "finished" && record.finished_at) {
    const ms = Date.parse(record.finished_at) - Date.parse(started);
    kind = "task-took";
    value = Number.isNaN(ms) ? "" : duration(ms);
    title = `ran ${value}, ${started} to ${record.finished_at}`;
  } else if (record.state === "queued" || !record.state) {
    kind = "task-age";
    value = age(record.created_at, now);
    title = `queued ${value} ago, at ${record.created_at || "?"}`;
  } else {
    kind = "task-elapsed";
    value = age(started, now);
    title = `running for ${value}, since ${started || "?"}`;
  }
  const className = `task-time ${kind}`;
  if (el.className !== className) el.className = className;
  setText(el, value);
  if (el.title !== title) el.title = title;
  return kind !== "task-took";
}
