// The controls of a finished task: Retry, and Fork… (a dialog asking for a prompt and,
// optionally, one of the task's snapshots). Cancel and message are app.js's (a running task).
//
// Invariants:
// - Retry and Fork are shown only for a finished task (trace.js says when through setFinished);
//   cancel and message are disabled then (trace.js).
// - A submission goes through lineage.js (api.js's sendEvent); on success the page goes to the
//   new task, on a refusal the error (with its field) shows next to the buttons.
// - The dialog is a modal <dialog>: focus moves into it, Escape closes it, focus comes back.

import { ApiError } from "./api.js";
import { size, text } from "./dom.js";
import { forkTask, listSnapshots, retryTask } from "./lineage.js";

export class Controls {
  constructor(root, taskId, record) {
    this.taskId = taskId;
    this.record = record; // () => the task's latest record
    this.el = {
      done: root.querySelector("#tv-done-controls"),
      retry: root.querySelector("#tv-retry"),
      fork: root.querySelector("#tv-fork"),
      dialog: root.querySelector("#tv-fork-dialog"),
      form: root.querySelector("#tv-fork-form"),
      cancel: root.querySelector("#tv-fork-cancel"),
      error: root.querySelector("#tv-fork-error"),
      result: root.querySelector("#tv-command-result"),
    };
    this.finished = false;
    this.handlers = [
      [this.el.retry, "click", () => this.retry()],
      [this.el.fork, "click", () => this.openFork()],
      [this.el.cancel, "click", () => this.el.dialog.close()],
      [this.el.form, "submit", (e) => this.fork(e)],
    ];
    for (const [el, name, fn] of this.handlers) el.addEventListener(name, fn);
    this.setFinished(false);
  }

  detach() {
    for (const [el, name, fn] of this.handlers) el.removeEventListener(name, fn);
    if (this.el.dialog.open) this.el.dialog.close();
  }

  setFinished(finished) {
    this.finished = finished;
    this.el.done.hidden = !finished;
  }

  say(message, error = false) {
    this.el.result.className = `command-result${error ? " error" : ""}`;
    text(this.el.result, message);
  }

  describe(exc) {
    return exc instanceof ApiError ? exc.describe() : String(exc?.message || exc);
  }

  async retry() {
    this.el.retry.disabled = true;
    this.say("retry: submitting…");
    try {
      const child = await retryTask(this.taskId);
      this.say(`retry: submitted ${child || ""}`.trim());
      if (child) location.hash = `#/tasks/${child}`;
    } catch (exc) {
      this.say(`retry: ${this.describe(exc)}`, true);
    } finally {
      this.el.retry.disabled = false;
    }
  }

  async openFork() {
    const { dialog, form, error } = this.el;
    error.hidden = true;
    const select = form.elements.snapshot;
    select.replaceChildren(new Option("the newest snapshot", ""));
    dialog.showModal();
    form.elements.prompt.focus();
    const snapshots = await listSnapshots(this.taskId, this.record());
    if (!dialog.open) return;
    for (const s of [...snapshots].sort((a, b) => String(b.key).localeCompare(String(a.key)))) {
      const note = typeof s.size === "number" ? ` (${size(s.size)})` : "";
      select.append(new Option(`${s.name || s.key}${note}`, s.key));
    }
  }

  async fork(e) {
    e.preventDefault(); // the dialog closes once the fork is accepted, not before
    const { dialog, form, error } = this.el;
    const prompt = form.elements.prompt.value.trim();
    if (!prompt) {
      text(error, "a prompt is required (field: prompt)");
      error.hidden = false;
      form.elements.prompt.focus();
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    error.hidden = true;
    try {
      const child = await forkTask(this.taskId, prompt, form.elements.snapshot.value);
      dialog.close();
      form.elements.prompt.value = "";
      this.say(`fork: submitted ${child || ""}`.trim());
      if (child) location.hash = `#/tasks/${child}`;
    } catch (exc) {
      text(error, this.describe(exc));
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  }
}
