// The outcome banner at the top of a finished task: what happened, in words.
//
// It reads exactly the fields of the terminal status event and the task record (issue 12,
// contract C): outcome, reason, summary, failure_class, detail, attempts, deadline_seconds,
// queued_seconds, started_at, finished_at.
//
// Invariants:
// - A done task's headline is its summary; any other outcome's is its reason (else its summary).
// - The banner always says something in words: a missing, empty or "null"/"None" reason or
//   summary falls back to a sentence for the outcome, never to the text "null".
// - The detail (a traceback, a log tail) is folded behind a <details>; its <pre> is focusable.
// - The queue time is its own fact; the run time counts from the first start.

import { append, duration, h } from "./dom.js";
import { scrollablePre } from "./outputs.js";

const FALLBACK = {
  done: "The agent finished and gave no summary.",
  failed: "The task failed and no reason was recorded.",
  cancelled: "The task was cancelled.",
  deadline: "The task ran out of time.",
  budget_exhausted: "The task used up its budget.",
};

const CLASS_WORDS = {
  fatal: "fatal: retrying the same task cannot fix this",
  transient: "transient: a retry may succeed",
};

// A string a person can read, or null for anything empty or a serialised nothing.
export function words(value) {
  if (typeof value !== "string") return null;
  const said = value.trim();
  return said && !["null", "none", "undefined"].includes(said.toLowerCase()) ? said : null;
}

function seconds(value) {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? value : null;
}

// The facts under the headline, as [label, value] pairs; only those the data gives.
export function outcomeFacts(info) {
  const facts = [];
  if (Number.isSafeInteger(info.attempts) && info.attempts > 0) facts.push(["attempts", String(info.attempts)]);
  const started = Date.parse(info.started_at);
  const finished = Date.parse(info.finished_at);
  const ran = Number.isNaN(started) || Number.isNaN(finished) ? null : finished - started;
  const limit = seconds(info.deadline_seconds);
  if (ran !== null) facts.push(["ran", duration(ran) + (limit !== null ? ` of a ${duration(limit * 1000)} deadline` : "")]);
  else if (limit !== null) facts.push(["deadline", duration(limit * 1000)]);
  const queued = seconds(info.queued_seconds);
  if (queued !== null) facts.push(["queued", duration(queued * 1000)]);
  return facts;
}

// Fill `el` (the #tv-outcome element) for a finished task.
export function renderOutcome(el, info) {
  const outcome = words(info.outcome) || "unknown";
  const reason = words(info.reason);
  const summary = words(info.summary);
  // A task that is done is told by its summary; the record's reason there is a Job's word ("CompletionsReached").
  const headline = (outcome === "done" ? summary : reason || summary) || FALLBACK[outcome] || `The task ended: ${outcome}.`;
  const klass = words(info.failure_class);
  const facts = outcomeFacts(info);
  const detail = words(info.detail);
  el.dataset.outcome = outcome;
  el.className = `outcome outcome-${outcome}`;
  // replaceChildren turns null into the text "null" (how a banner once read "DONE null"): append skips it.
  el.replaceChildren();
  append(el, [
    h(
      "p",
      { class: "outcome-line" },
      h("strong", { class: "outcome-word" }, outcome.replace(/_/g, " ")),
      h("span", { class: "outcome-reason" }, headline),
    ),
    klass ? h("p", { class: `outcome-class class-${klass}` }, CLASS_WORDS[klass] || klass) : null,
    summary && summary !== headline ? h("p", { class: "outcome-summary" }, summary) : null,
    facts.length ? h("dl", { class: "outcome-facts" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", { dataset: { fact: k } }, v)))) : null,
    detail ? h("details", { class: "outcome-detail" }, h("summary", {}, "details"), scrollablePre(detail, "details of the outcome")) : null,
  ]);
  el.hidden = false;
}
