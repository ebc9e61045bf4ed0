// The live trace of one task, from GET api/stream/<id> (Server-Sent Events).
//
// Invariants:
// - Each message is rendered at most once: `lastId` is the highest SSE id shown,
//   and a message with an id at or below it is dropped. Nothing is skipped: after
//   a disconnect the browser resumes with Last-Event-ID (or we reopen with
//   ?after=lastId) and the server sends every later message of the task in order.
// - Every rendered message carries its id in a data-id attribute. A tool's end is
//   rendered inside its start (paired by call_id), everything else in stream order.
// - `end` closes the EventSource; without that it would reconnect forever.
// - Event data only ever reaches the page as text (see dom.js); the model's words too.
// - A model call is "thinking… Ns" from its opening `thought` event until the one
//   that closes it (same turn), or until a status event or the end says the attempt
//   is over. Its row stays in the DOM (hidden) so every message keeps its element.
// - Totals count a model turn once (a replayed turn replaces its first try); tokens
//   and cost come from the model gateway's `usage` events when there are any, else
//   tokens from the provider's counts in the thoughts (as functions/cli/render.py).
// - The view opens at its top and follows the live end only while the person is at the
//   bottom (follow.js); filters, folds and the jump to the first error are tracetools.js's,
//   tool output outputs.js's, the outcome banner outcome.js's, retry/fork controls.js's.
// - A snapshot the snapshotter took because its pod was stopped is "at stop"; only the last
//   one of a finished task is "final" (the task may have resumed after the others).

import { age, append, clock, compact, duration, h, oneLine, size, text } from "./dom.js";
import { ApiError, getJSON } from "./api.js";
import { Controls } from "./controls.js";
import { Follower } from "./follow.js";
import { ARTIFACTS, artifactHref, keyHref } from "./lineage.js";
import { renderOutcome, words } from "./outcome.js";
import { copyButton, outputParts, scrollablePre, toolOutput } from "./outputs.js";
import { TraceTools } from "./tracetools.js";

// SSE event names the server sends: the event's "type", "log" for log records,
// "event" for a body without a usable type. A listener per name is needed.
const EVENT_NAMES = ["status", "phase", "tool", "thought", "usage", "todo", "snapshot", "result", "message", "warning", "log", "event"];
const LEVELS = { DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40, CRITICAL: 50 };
const MAX_BACKOFF_MS = 10000;
const RECORD_WAIT_MS = 30000; // after `end`, how long to wait for job_finished to record the snapshots

export class TaskView {
  constructor(root, taskId) {
    this.root = root;
    this.taskId = taskId;
    this.el = {
      title: root.querySelector("#tv-title"),
      conn: root.querySelector("#tv-conn"),
      facts: root.querySelector("#tv-facts"),
      prompt: root.querySelector("#tv-prompt"),
      outcome: root.querySelector("#tv-outcome"),
      trace: root.querySelector("#tv-trace"),
      todo: root.querySelector("#tv-todo"),
      snapshots: root.querySelector("#tv-snapshots"),
      storedKeys: root.querySelector("#tv-stored"),
      error: root.querySelector("#tv-error"),
      totals: root.querySelector("#tv-totals"),
      artifacts: root.querySelector("#tv-artifacts"),
      follow: root.querySelector("#tv-follow"),
    };
    this.lastId = 0;
    this.ended = false;
    this.closed = false;
    this.es = null;
    this.backoff = 500;
    this.timers = new Set();
    this.calls = new Map(); // call_id -> {details, badge}
    this.body = this.el.trace; // where the next row goes: the current phase's section
    this.facts = { state: null, phase: null, outcome: null, model: null, created_at: null };
    this.thinking = new Map(); // turn -> {row, indicator, since}: model calls open now
    this.turns = new Map(); // turn -> its closing thought
    this.byResponse = new Map(); // response_id -> the meta line of its thought (the gateway's cost joins there)
    this.costs = new Map(); // response_id -> the gateway's usage event, for a thought that comes after it
    this.gateway = { calls: 0, input: 0, output: 0, cost: 0 };
    this.phase = null; // {took, since}: the phase now running
    this.span = { started: null, finished: null }; // the task's first start and its end
    this.ticking = false;
    this.outcome = {}; // the outcome banner's fields (contract C), from the record and the events
    this.record = null;
    this.stopSnapshots = []; // per final snapshot, its labels: "at stop" unless the last of a finished task
    this.phaseCalls = null; // the running phase's call counter
    this.el.trace.addEventListener("toggle", openBodies, true); // toggle does not bubble: caught on the way down
    this.follower = this.el.follow ? new Follower(this.el.trace, this.el.follow) : null;
    this.tools = root.querySelector("#tv-filter-tool") ? new TraceTools(root, this.el.trace, this.follower) : null;
    this.controls = root.querySelector("#tv-done-controls") ? new Controls(root, taskId, () => this.record) : null;
    this.reset();
  }

  reset() {
    const { title, trace, todo, snapshots, storedKeys, outcome, prompt, error } = this.el;
    text(title, this.taskId);
    trace.replaceChildren();
    todo.replaceChildren(h("li", { class: "muted" }, "no todo list yet"));
    snapshots.replaceChildren();
    storedKeys.replaceChildren(h("li", { class: "muted" }, "recorded when the task has finished"));
    this.el.artifacts?.replaceChildren(h("li", { class: "muted" }, "available once the task has finished"));
    outcome.hidden = true;
    outcome.replaceChildren();
    delete outcome.dataset.outcome;
    text(prompt, "");
    text(error, "");
    error.hidden = true;
    this.renderFacts();
    this.renderTotals();
  }

  start() {
    this.follower?.setLive(true);
    this.setConn("connecting", "connecting…");
    this.loadRecord();
    this.open();
  }

  close() {
    this.closed = true;
    this.el.trace.removeEventListener("toggle", openBodies, true);
    this.follower?.detach();
    this.tools?.detach();
    this.controls?.detach();
    this.es?.close();
    this.es = null;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  later(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      if (!this.closed) fn();
    }, ms);
    this.timers.add(t);
  }

  // --- the EventSource -------------------------------------------------------------

  open() {
    if (this.closed || this.ended) return;
    const after = this.lastId ? `?after=${this.lastId}` : "";
    const es = new EventSource(`api/stream/${encodeURIComponent(this.taskId)}${after}`);
    this.es = es;
    for (const name of EVENT_NAMES) es.addEventListener(name, (e) => this.receive(name, e));
    es.addEventListener("end", () => this.finish());
    es.onopen = () => {
      this.backoff = 500;
      this.setConn("live", "live");
    };
    es.onerror = () => {
      if (this.closed || this.ended || this.es !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error answer, not a dropped connection): reopen ourselves.
        es.close();
        this.es = null;
        this.reopenLater();
      } else {
        this.setConn("reconnecting", "reconnecting…");
      }
    };
  }

  async reopenLater() {
    this.setConn("reconnecting", "reconnecting…");
    if (this.lastId === 0) {
      // Nothing received yet: an unknown task is worth saying, and not worth retrying.
      try {
        await getJSON(`api/tasks/${encodeURIComponent(this.taskId)}`);
      } catch (exc) {
        if (this.closed) return;
        if (exc instanceof ApiError && exc.status === 404) {
          this.showError(exc.describe());
          this.setConn("error", "no such task");
          return;
        }
      }
    }
    const wait = this.backoff;
    this.backoff = Math.min(this.backoff * 2, MAX_BACKOFF_MS);
    this.later(wait, () => this.open());
  }

  receive(name, e) {
    if (this.closed || this.ended) return;
    const id = e.lastEventId ? Number(e.lastEventId) : NaN;
    if (Number.isSafeInteger(id)) {
      if (id <= this.lastId) return; // a message we have shown already
      this.lastId = id;
    }
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      data = { raw: e.data };
    }
    if (!data || typeof data !== "object" || Array.isArray(data)) data = { value: data };
    this.render(name, data, Number.isSafeInteger(id) ? id : null);
    this.follower?.rendered();
  }

  finish() {
    if (this.ended) return;
    this.ended = true;
    this.stopThinking("the trace ended during this model call");
    this.follower?.setLive(false);
    this.es?.close();
    this.es = null;
    this.setConn("ended", "ended");
    this.waitForRecord(Date.now() + RECORD_WAIT_MS);
  }

  setConn(state, label) {
    const { conn } = this.el;
    conn.dataset.state = state;
    text(conn, label);
  }

  showError(message) {
    text(this.el.error, message);
    this.el.error.hidden = false;
  }

  // --- the task record (api/tasks/<id>) -----------------------------------------------

  async loadRecord() {
    try {
      const record = await getJSON(`api/tasks/${encodeURIComponent(this.taskId)}`);
      if (!this.closed) this.applyRecord(record);
      return record;
    } catch {
      return null; // the stream says the rest; a missing record is reported by reopenLater
    }
  }

  // job_finished stores the final snapshot and records its keys after the agent's own end.
  async waitForRecord(deadline) {
    const record = await this.loadRecord();
    if (this.closed) return;
    const settled = record && (record.finished_uids?.length || record.final_snapshot_missing);
    if (!settled && Date.now() < deadline) this.later(1000, () => this.waitForRecord(deadline));
  }

  applyRecord(record) {
    if (!record || typeof record !== "object") return;
    const task = record.task && typeof record.task === "object" ? record.task : {};
    // The record trails the stream (the tracker writes it): it only fills in what no event has told yet.
    const fresher = this.lastId === 0 || (record.state === "finished" && this.facts.state !== "finished");
    if (fresher) for (const key of ["state", "phase", "outcome"]) if (record[key]) this.facts[key] = record[key];
    if (record.created_at) this.facts.created_at = record.created_at;
    if (record.finished_at) this.facts.finished_at = record.finished_at;
    if (record.started_at) this.facts.started_at = record.started_at;
    if (record.parent?.task_id) this.facts.parent = record.parent;
    if (task.model) this.facts.model ??= task.model;
    if (task.prompt) text(this.el.prompt, task.prompt);
    if (task.repo?.url) this.facts.repo = task.repo.url + (task.repo.ref ? ` @ ${task.repo.ref}` : "");
    this.renderFacts();
    this.record = record;
    if (record.state === "finished" && record.outcome) {
      // The record is the settled word; the status event may have said some of it first.
      this.showOutcome(pick(record, OUTCOME_FIELDS));
    }
    this.renderStoredKeys(record);
    this.renderArtifacts(record);
    this.relabelSnapshots();
  }

  renderArtifacts(record) {
    const el = this.el.artifacts;
    if (!el) return;
    if (record.state !== "finished") return;
    const stored = Array.isArray(record.snapshot_keys) && record.snapshot_keys.some((k) => /\/final\//.test(k));
    if (!stored) {
      const note = record.final_snapshot_missing ? "the final snapshot is missing: nothing to download" : "waiting for the final snapshot…";
      el.replaceChildren(h("li", { class: "muted" }, note));
      return;
    }
    el.replaceChildren(
      ...ARTIFACTS.map(([name, what]) => h("li", {}, h("a", { href: artifactHref(this.taskId, name), download: name }, name), h("span", { class: "muted" }, ` ${what}`))),
    );
  }

  // Only the last stop snapshot of a finished task is its final one.
  relabelSnapshots() {
    const finished = this.facts.state === "finished";
    this.stopSnapshots.forEach((labels, i) => {
      const final = finished && i === this.stopSnapshots.length - 1;
      for (const label of labels) {
        text(label, final ? "final" : "at stop");
        label.className = `tag ${final ? "final" : "at-stop"}`;
      }
    });
  }

  renderStoredKeys(record) {
    const keys = Array.isArray(record.snapshot_keys) ? record.snapshot_keys : [];
    const finished = record.state === "finished";
    const items = keys.map((key) => {
      const href = keyHref(this.taskId, key);
      const name = h("code", {}, key);
      const tag = /\/final\//.test(key) ? h("span", { class: `tag ${finished ? "final" : "at-stop"}` }, finished ? "final" : "at stop") : null;
      return h("li", {}, href ? h("a", { href, download: key.split("/").pop() }, name) : name, tag);
    });
    if (record.final_snapshot_missing) items.push(h("li", { class: "warn" }, "the final snapshot is missing (see the server log)"));
    if (record.last_snapshot_at && !keys.length) items.push(h("li", {}, `last snapshot ${age(record.last_snapshot_at)} ago`));
    if (!items.length) {
      const note = record.state === "finished" ? "none recorded yet" : "recorded when the task has finished";
      items.push(h("li", { class: "muted" }, note));
    }
    this.el.storedKeys.replaceChildren(...items);
  }

  renderFacts() {
    const f = this.facts;
    const over = f.state === "finished";
    const rows = [
      ["state", f.state ? h("span", { class: `badge state-${f.state}` }, f.state) : "—"],
      ["phase", f.phase ? h("span", { class: `badge phase-${f.phase}` }, f.phase) : "—"],
      ["outcome", f.outcome ? h("span", { class: `badge outcome-${f.outcome}` }, f.outcome) : "—"],
      ["model", f.model || "default"],
    ];
    // From the first start: the time queued is the banner's own figure.
    const took = over && f.finished_at ? Date.parse(f.finished_at) - Date.parse(f.started_at || f.created_at || this.span.started) : NaN;
    // A finished task's age would keep growing: it shows durations instead.
    if (!Number.isNaN(took)) rows.push(["took", duration(took)]);
    else rows.push(["age", f.created_at ? age(f.created_at) : "—"]);
    if (f.repo) rows.push(["repo", f.repo]);
    if (f.parent) {
      // The lineage (contract D): a link back to the task this one was retried or forked from.
      const link = h("a", { href: `#/tasks/${encodeURIComponent(f.parent.task_id)}` }, f.parent.task_id);
      rows.push([f.parent.workspace === "fresh" ? "retry of" : "forked from", link]);
    }
    this.el.facts.replaceChildren(...rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    // Cancel and message are for a running task (a finished one would only answer 409); retry and fork for a finished one.
    for (const control of this.root.querySelectorAll("#tv-cancel, #tv-message-form input, #tv-message-form button")) {
      control.disabled = over;
    }
    this.controls?.setFinished(over);
  }

  // Merge what is known about the outcome and show the banner.
  showOutcome(info) {
    this.outcome = { ...this.outcome, ...definedOnly(info) };
    renderOutcome(this.el.outcome, this.outcome);
  }

  // --- rendering, one function per event type (as functions/render.py) ---------------

  render(name, data, id) {
    const kind = name === "log" ? "log" : data.type || name;
    const renderer = RENDERERS[kind] || renderUnknown;
    const row = renderer.call(this, data, kind);
    if (!row) return;
    if (id !== null) row.dataset.id = id;
    row.dataset.type = kind;
    if (!row.isConnected) this.body.append(row);
    if (!row.matches(".tool-result")) this.tools?.admit(row); // a result is its call's: admitted with the call
  }

  // --- model calls, durations and totals -------------------------------------------

  // Every open model call says for how long it has been thinking; the phase running and the task grow too.
  tick() {
    const now = Date.now();
    for (const call of this.thinking.values()) text(call.indicator, `thinking… ${Math.max(0, Math.floor((now - call.since) / 1000))}s`);
    if (this.phase) text(this.phase.took, duration(now - this.phase.since));
    this.renderTotals(now);
    if (this.thinking.size || (this.phase && !this.ended)) this.keepTicking();
  }

  keepTicking() {
    if (this.ticking) return;
    this.ticking = true;
    this.later(1000, () => {
      this.ticking = false;
      this.tick();
    });
  }

  // The attempt that made these calls is over (a status event, the end): they are not thinking any more.
  stopThinking(why) {
    for (const call of this.thinking.values()) {
      text(call.indicator, why);
      call.indicator.classList.remove("thinking");
      call.indicator.classList.add("muted");
    }
    this.thinking.clear();
  }

  endPhase(ts) {
    if (!this.phase) return;
    const end = Date.parse(ts);
    text(this.phase.took, Number.isNaN(end) ? "" : duration(end - this.phase.since));
    this.phase = null;
  }

  renderTotals(now = Date.now()) {
    const el = this.el.totals;
    if (!el) return;
    const turns = [...this.turns.values()];
    const g = this.gateway;
    const usages = turns.map((t) => t.usage).filter((u) => u && typeof u === "object");
    const tokens = g.calls
      ? [g.input, g.output, "model gateway"]
      : [usages.reduce((n, u) => n + count(u.input_tokens), 0), usages.reduce((n, u) => n + count(u.output_tokens), 0), usages.length ? "provider" : ""];
    const modelMs = turns.reduce((n, t) => n + count(t.latency_ms), 0);
    const started = Date.parse(this.span.started);
    const finished = Date.parse(this.span.finished);
    const rows = [
      ["model turns", "turns", String(turns.length)],
      ["model time", "model-time", duration(modelMs)],
      ["tokens", "tokens", tokens[2] ? `${tokens[0].toLocaleString("en")} in / ${tokens[1].toLocaleString("en")} out (${tokens[2]})` : "—"],
      ["cost", "cost", g.calls ? `$${g.cost.toFixed(4)}` : "—"],
      ["task time", "task-time", Number.isNaN(started) ? "—" : duration((Number.isNaN(finished) ? now : finished) - started)],
    ];
    // Updated in place (this runs every second while a phase runs): no new nodes, no relayout of the trace.
    if (el.children.length !== rows.length) {
      el.replaceChildren(...rows.map(([k, key, v]) => h("div", {}, h("dt", {}, k), h("dd", { dataset: { total: key } }, v))));
      return;
    }
    for (const [, key, v] of rows) {
      const dd = el.querySelector(`dd[data-total="${key}"]`);
      if (dd.textContent !== v) dd.textContent = v;
    }
  }
}

// A count or duration from an event; 0 when it is missing or not a non-negative number.
function count(value) {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? value : 0;
}

function tokensLine(usage) {
  return usage && typeof usage === "object" ? `${count(usage.input_tokens)} in / ${count(usage.output_tokens)} out` : null;
}

function row(kind, ts, ...content) {
  return h("div", { class: `ev ev-${kind}` }, h("time", { class: "t", datetime: ts || null }, clock(ts)), h("div", { class: "c" }, content));
}

// The argument a person wants to see in one line: the command, the path; else compact JSON.
function mainArg(args) {
  if (args && typeof args === "object") {
    for (const key of ["command", "path", "pattern", "query"]) if (typeof args[key] === "string") return oneLine(args[key]);
    return oneLine(compact(args));
  }
  return oneLine(args ?? "");
}

function argList(args, tool) {
  if (!args || typeof args !== "object") return scrollablePre(String(args ?? ""), `${tool} arguments`, "args");
  const entries = Object.entries(args);
  if (!entries.length) return h("p", { class: "muted" }, "no arguments");
  return h(
    "dl",
    { class: "args" },
    entries.map(([k, v]) => {
      const value = typeof v === "string" ? v : JSON.stringify(v, null, 2);
      const copy = k === "command" ? copyButton(() => value, `Copy command of ${tool}`, "copy command") : null;
      return [h("dt", {}, k, copy), h("dd", {}, scrollablePre(value, `${tool} ${k}`))];
    }),
  );
}

const RENDERERS = {
  phase(data) {
    const phase = String(data.phase || "?");
    this.facts.phase = phase;
    this.renderFacts();
    const detail = data.objective ? ["objective: ", data.objective] : data.report ? ["report: ", data.report] : [];
    const body = h("div", { class: "phase-body" });
    const took = h("span", { class: "phase-took", title: "how long this phase ran" });
    const calls = h("span", { class: "phase-calls" }, "0 calls");
    const section = h(
      "section",
      { class: `phase phase-${phase}` },
      h(
        "details",
        { class: "phase-fold", open: true },
        h(
          "summary",
          {},
          h("h4", { class: "phase-head" }, h("span", { class: "phase-name" }, phase), h("span", { class: "phase-detail" }, detail), h("time", { class: "t" }, clock(data.ts)), took, calls),
        ),
        body,
      ),
    );
    this.phaseCalls = { el: calls, n: 0 };
    this.el.trace.append(section);
    this.body = body;
    this.endPhase(data.ts);
    const since = Date.parse(data.ts);
    if (!Number.isNaN(since)) {
      this.phase = { took, since }; // until the next phase or the finished status
      this.keepTicking();
    }
    return section;
  },

  tool(data) {
    const name = String(data.name || "tool");
    const callId = typeof data.call_id === "string" ? data.call_id : null;
    if (data.stage === "end") {
      const ok = data.ok !== false;
      const took = typeof data.seconds === "number" ? ` ${data.seconds.toFixed(1)}s` : "";
      const result = h(
        "div",
        { class: `tool-result ${ok ? "ok" : "error"}` },
        h("div", { class: "tool-result-head" }, h("time", { class: "t" }, clock(data.ts)), `${ok ? "ok" : "error"}${took}`),
      );
      let call = callId ? this.calls.get(callId) : null;
      if (!call) call = this.toolCall(data, name, callId); // its start came before this view (or never)
      call.details.append(result);
      const output = outputParts(data);
      call.details.searchText.push(output.head, output.tail);
      whenOpen(call.details, () => append(result, toolOutput(data, this.taskId, name)));
      text(call.badge, `${ok ? "ok" : "error"}${took}`);
      call.badge.className = `badge tool-state ${ok ? "ok" : "error"}`;
      call.details.classList.add(ok ? "done" : "failed");
      call.details.dataset.status = ok ? "ok" : "error";
      if (!ok) this.tools?.sawError();
      this.tools?.admit(call.details);
      if (callId) this.calls.delete(callId);
      return result;
    }
    const call = this.toolCall(data, name, callId);
    if (callId) this.calls.set(callId, call);
    if (this.phaseCalls) {
      this.phaseCalls.n += 1;
      text(this.phaseCalls.el, `${this.phaseCalls.n} call${this.phaseCalls.n === 1 ? "" : "s"}`);
    }
    return call.details;
  },

  thought(data) {
    const turn = Number.isSafeInteger(data.turn) ? data.turn : null;
    const phase = String(data.phase || "");
    if (data.open) {
      // Not a live region: a screen reader would read the count every second.
      const indicator = h("span", { class: "thinking" }, "thinking… 0s");
      const el = row("thinking", data.ts, h("span", { class: "label" }, "model"), indicator);
      const since = Date.parse(data.ts);
      if (turn !== null) this.thinking.set(turn, { row: el, indicator, since: Number.isNaN(since) ? Date.now() : Math.min(since, Date.now()) });
      this.keepTicking();
      return el;
    }
    const took = duration(count(data.latency_ms));
    const open = turn !== null ? this.thinking.get(turn) : null;
    if (open) {
      open.row.hidden = true; // the call is over: its words (below) replace the indicator
      open.indicator.classList.remove("thinking");
      text(open.indicator, `answered in ${took}`);
      this.thinking.delete(turn);
    }
    if (turn !== null) this.turns.set(turn, data);
    if (data.error) {
      this.renderTotals();
      this.tools?.sawError();
      const failed = row("thought", data.ts, h("span", { class: "label" }, "model call failed"), h("span", { class: "thought-error" }, `after ${took}: ${data.error}`));
      failed.classList.add("failed");
      return failed;
    }
    const calls = count(data.tool_calls);
    const facts = [phase, took, tokensLine(data.usage), calls ? `${calls} tool call${calls === 1 ? "" : "s"}` : null].filter(Boolean);
    const meta = h("span", { class: "thought-meta" }, facts.join(" · "));
    const responseId = typeof data.response_id === "string" ? data.response_id : null;
    if (responseId) {
      this.byResponse.set(responseId, meta);
      const usage = this.costs.get(responseId);
      if (usage) joinCost(meta, usage);
    }
    const said = typeof data.text === "string" && data.text ? h("div", { class: "thought-text" }, data.text) : h("div", { class: "thought-text muted" }, "(no text)");
    this.renderTotals();
    return row("thought", data.ts, h("div", { class: "thought-head" }, h("span", { class: "label" }, "thought"), meta), said);
  },

  usage(data) {
    if (data.refused) {
      return row("usage", data.ts, h("span", { class: "label" }, "model gateway refused a call"), String(data.refused));
    }
    const g = this.gateway;
    g.calls += 1;
    g.input += count(data.input_tokens);
    g.output += count(data.output_tokens);
    g.cost += count(data.cost_usd);
    const responseId = typeof data.response_id === "string" ? data.response_id : null;
    if (responseId) {
      this.costs.set(responseId, data);
      const meta = this.byResponse.get(responseId);
      if (meta) joinCost(meta, data);
    }
    this.renderTotals();
    const cost = typeof data.cost_usd === "number" ? ` · $${count(data.cost_usd).toFixed(4)}` : "";
    return row("usage", data.ts, h("span", { class: "label" }, "usage"), `${data.model || "?"} ${tokensLine(data)}${cost} · ${duration(count(data.latency_ms))}`);
  },

  todo(data) {
    const todos = Array.isArray(data.todos) ? data.todos : [];
    this.el.todo.replaceChildren(...(todos.length ? todos.map((t) => h("li", {}, String(t))) : [h("li", { class: "muted" }, "(empty)")]));
    return row("todo", data.ts, h("span", { class: "label" }, "todo"), todos.length ? todos.map((t) => h("span", { class: "todo-item" }, oneLine(t, 60))) : "(empty)");
  },

  status(data) {
    const state = String(data.state || "status");
    this.stopThinking(state === "finished" ? "the task finished during this model call" : "this attempt ended during this model call");
    if ((state === "started" || state === "resumed") && !this.span.started) this.span.started = data.ts;
    if (state === "finished") {
      this.span.finished = data.ts;
      this.facts.finished_at ??= data.finished_at || data.ts; // the record, when it comes, says the same
      this.endPhase(data.ts);
    }
    this.renderTotals();
    this.facts.state = state;
    if (data.model) this.facts.model = data.model;
    if (data.outcome) this.facts.outcome = data.outcome;
    this.renderFacts();
    let rest = data.reason ? `(${data.reason})` : "";
    if (state === "started") rest = data.model ? `with model ${data.model}` : "";
    else if (state === "resumed") {
      const where = data.phase ? ` in ${data.phase}` : "";
      rest = `from checkpoint${where} (${data.model_turns ?? 0} model turns, ${data.tool_calls ?? 0} tool calls done)`;
    } else if (state === "retrying") {
      const after = data.exit_code !== undefined && data.exit_code !== null ? ` after exit code ${data.exit_code}` : "";
      const wait = typeof data.backoff_seconds === "number" ? `, in ${data.backoff_seconds}s` : "";
      rest = `attempt ${data.attempt ?? "?"}${after}${wait}`;
    } else if (state === "finished") {
      const outcome = data.outcome || "unknown";
      const said = words(data.summary) && data.summary !== this.resultSummary ? data.summary : words(data.reason) ? `(${data.reason})` : "";
      rest = [h("span", { class: `badge outcome-${outcome}` }, outcome), said];
      this.showOutcome({ outcome, ...pick(data, OUTCOME_FIELDS), finished_at: data.finished_at || data.ts });
      this.relabelSnapshots();
    }
    const el = row("status", data.ts, h("span", { class: `badge state-${state}` }, state), rest);
    if (state === "finished" && FAILED_OUTCOMES.has(data.outcome)) {
      el.classList.add("failed");
      this.tools?.sawError();
    }
    return el;
  },

  snapshot(data) {
    const key = data.archive_key || data.key;
    const label = data.final ? h("span", { class: "tag at-stop" }, "at stop") : null;
    const traceLabel = data.final ? h("span", { class: "tag at-stop" }, "at stop") : null;
    let line;
    if (data.final) line = `${key || ""} ${size(data.archive_size || data.size)}`;
    else if (!data.key) line = "nothing to snapshot yet";
    else line = `${data.key} ${size(data.size)}${data.uploaded === false ? " (unchanged)" : ""}`;
    if (key) {
      const href = keyHref(this.taskId, key);
      const code = h("code", {}, key);
      this.el.snapshots.append(h("li", {}, h("time", { class: "t" }, clock(data.ts)), " ", href ? h("a", { href, download: key.split("/").pop() }, code) : code, label));
    }
    if (data.final) {
      this.stopSnapshots.push([label, traceLabel]);
      this.relabelSnapshots();
    }
    return row("snapshot", data.ts, h("span", { class: "label" }, "snapshot"), traceLabel, " ", line.trim());
  },

  result(data) {
    const outcome = data.outcome || "unknown";
    this.facts.outcome = outcome;
    this.renderFacts();
    this.showOutcome({ outcome, summary: data.summary, ...pick(data, ["reason", "failure_class", "detail"]) });
    this.resultSummary = data.summary;
    return row("result", data.ts, h("span", { class: `badge outcome-${outcome}` }, outcome), data.summary || "");
  },

  message(data) {
    return row("message", data.ts, h("span", { class: "label" }, "message to the agent"), String(data.text ?? ""));
  },

  warning(data) {
    const said = data.message || data.text || compact(data, ["type", "task_id", "ts"]);
    return row("warning", data.ts, h("span", { class: "label" }, "warning"), String(said));
  },

  log(data) {
    const level = String(data.level || "INFO").toUpperCase();
    const el = row(
      "log",
      data.ts,
      h("span", { class: `lvl lvl-${level}` }, level),
      h("span", { class: "logger" }, data.logger || "-"),
      h("span", { class: "msg" }, String(data.msg ?? "")),
      data.exc ? h("pre", { class: "exc" }, String(data.exc)) : null,
    );
    el.dataset.level = LEVELS[level] ?? 20;
    if (el.dataset.level >= 40) this.tools?.sawError();
    return el;
  },
};

TaskView.prototype.toolCall = function (data, name, callId) {
  const badge = h("span", { class: "badge tool-state running" }, data.stage === "end" ? "" : "running…");
  const arg = mainArg(data.args);
  // A clone of a fixed skeleton, filled with text: the one row a 2,000-call trace has 2,000 of.
  const details = TOOL_ROW.cloneNode(true);
  const summary = details.firstChild;
  const [time, toolName, toolArg] = summary.children;
  time.textContent = clock(data.ts);
  toolName.textContent = name;
  toolArg.textContent = arg;
  summary.append(badge);
  if (callId) details.dataset.call = callId;
  details.dataset.tool = name;
  details.dataset.status = "running";
  // What the filter's search reads: the call's data, whether or not its body was built yet.
  details.searchText = [name, arg, data.args === undefined ? "" : compact(data.args)];
  if (data.args !== undefined) whenOpen(details, () => summary.after(argList(data.args, name)));
  this.tools?.sawTool(name);
  if (data.stage === "end") this.body.append(details); // an end without its start: render it on its own
  return { details, badge };
};

// A tool call's body (arguments, output) is built when it is first opened: a trace of thousands of
// calls renders one line each. The row (and its data-id) exists from the start.
// The builders wait on the element; one capturing listener on the trace runs them (openBodies).
function whenOpen(details, build) {
  if (details.open) build();
  else (details.pending ??= []).push(build);
}

function openBodies(e) {
  const details = e.target;
  if (!details.open || !details.pending) return;
  const builders = details.pending;
  details.pending = null;
  for (const build of builders) build();
}

const TOOL_ROW = (() => {
  const skeleton = document.createElement("template");
  // A constant: no event data ever goes through innerHTML.
  skeleton.innerHTML = '<details class="ev ev-tool tool"><summary><time class="t"></time><span class="tool-name"></span><code class="tool-arg"></code></summary></details>';
  return skeleton.content.firstElementChild;
})();

// The gateway's counts and cost for a thought's call, next to the provider's.
function joinCost(meta, usage) {
  if (meta.querySelector(".thought-cost")) return;
  const cost = typeof usage.cost_usd === "number" ? `$${count(usage.cost_usd).toFixed(4)}` : "no price";
  meta.append(h("span", { class: "thought-cost", title: "as the model gateway counted it" }, ` · ${cost}`));
}

function renderUnknown(data, kind) {
  return row("other", data.ts, h("span", { class: "label" }, kind), compact(data, ["type", "task_id", "ts"]));
}

const OUTCOME_FIELDS = ["outcome", "reason", "summary", "failure_class", "detail", "attempts", "deadline_seconds", "queued_seconds", "started_at", "finished_at"];
const FAILED_OUTCOMES = new Set(["failed", "deadline"]);

function pick(from, keys) {
  return Object.fromEntries(keys.filter((k) => from && from[k] !== undefined).map((k) => [k, from[k]]));
}

function definedOnly(info) {
  return Object.fromEntries(Object.entries(info || {}).filter(([, v]) => v !== undefined && v !== null && v !== ""));
}
