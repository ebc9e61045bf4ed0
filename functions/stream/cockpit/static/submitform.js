// The "New task" form: reads and checks its fields, posts a task.submitted CloudEvent,
// and ties every error to the field it is about.
//
// Invariants:
// - The page's checks (model provider, task id, limits within the server's bounds, from
//   cockpit-config.json) only save a round trip; the server checks everything again and
//   its 4xx `{"error", "field"}` is shown the same way.
// - A faulty field is marked for everyone: aria-invalid="true", its message in the
//   element aria-describedby points at, and the keyboard focus moved to it.

import { ApiError, submitTask, submittedTaskId } from "./api.js";
import { isTaskId, text } from "./dom.js";

// The server's field names (functions/core/task.py) -> the form's inputs.
const FIELD_INPUTS = {
  prompt: "prompt",
  repo: "repo",
  "repo.url": "repo",
  "repo.ref": "ref",
  model: "model",
  limits: "deadline",
  "limits.deadline_seconds": "deadline",
  "limits.retries": "retries",
  task_id: "task_id",
};

export class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

export class SubmitForm {
  constructor({ details, form, error, opener }, { onSubmitted }) {
    this.details = details;
    this.form = form;
    this.error = error;
    this.opener = opener;
    this.onSubmitted = onSubmitted;
    this.config = { providers: [], limits: {} };
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
    // Editing a field clears its error: the message was about the old value.
    form.addEventListener("input", (e) => {
      if (e.target.getAttribute("aria-invalid") === "true") this.clearField(e.target);
    });
    opener.addEventListener("click", () => this.openForm());
    details.addEventListener("toggle", () => opener.setAttribute("aria-expanded", String(details.open)));
    opener.setAttribute("aria-expanded", String(details.open));
  }

  // What the server accepts: its providers and limits (cockpit-config.json).
  offer(config) {
    this.config = config;
    const { deadline_seconds: deadline, retries } = config.limits || {};
    const inputs = this.form.elements;
    if (Number.isSafeInteger(deadline?.max)) inputs.deadline.max = deadline.max;
    if (Number.isSafeInteger(deadline?.default)) inputs.deadline.placeholder = `default ${deadline.default}`;
    if (Number.isSafeInteger(retries?.max)) inputs.retries.max = retries.max;
    if (Number.isSafeInteger(retries?.default)) inputs.retries.placeholder = `default ${retries.default}`;
    if (config.providers.length) {
      text(document.getElementById("f-model-hint"), `provider:name, the provider one of ${config.providers.join(", ")}`);
    }
  }

  openForm() {
    this.details.open = true;
    this.opener.setAttribute("aria-expanded", "true"); // now, not at the "toggle" event a task later
    this.form.elements.prompt.focus();
    this.details.scrollIntoView({ block: "nearest" });
  }

  // The event's data from the fields, or a FieldError for the first faulty one.
  read() {
    const inputs = this.form.elements;
    const value = (name) => String(inputs[name].value || "").trim();
    const prompt = value("prompt");
    if (!prompt) throw new FieldError("prompt", "A prompt is required: say what the agent should do.");
    const repo = value("repo");
    const ref = value("ref");
    if (ref && !repo) throw new FieldError("ref", "A ref needs a repository URL.");
    const model = value("model");
    if (model) {
      const [provider, ...rest] = model.split(":");
      const name = rest.join(":");
      const known = this.config.providers;
      if (!rest.length || !provider || !name) {
        throw new FieldError("model", `The model must look like provider:name, e.g. ${known[0] || "scripted"}:example.`);
      }
      if (known.length && !known.includes(provider)) {
        throw new FieldError("model", `Unknown model provider "${provider}": use one of ${known.join(", ")}.`);
      }
    }
    const limits = this.config.limits || {};
    const deadline = integer(value("deadline"), "deadline", "The deadline", 1, limits.deadline_seconds?.max);
    const retries = integer(value("retries"), "retries", "Retries", 0, limits.retries?.max);
    const taskId = value("task_id");
    if (taskId && !isTaskId(taskId)) {
      throw new FieldError(
        "task_id",
        "A task id is 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit; leave it empty to have one derived.",
      );
    }
    return { prompt, repo, ref, model, deadline, retries, taskId };
  }

  async submit() {
    const button = this.form.querySelector("button[type=submit]");
    this.clearErrors();
    let fields;
    try {
      fields = this.read();
    } catch (exc) {
      this.showError(exc);
      return;
    }
    button.disabled = true;
    try {
      const { event, body } = await submitTask(fields);
      const taskId = await submittedTaskId(event, body);
      this.form.elements.prompt.value = "";
      this.form.elements.task_id.value = ""; // an id names one task: the next one needs another
      this.details.open = false; // the list gets its room back; the other fields stay for the next task
      this.onSubmitted(taskId);
    } catch (exc) {
      this.showError(exc);
    } finally {
      button.disabled = false;
    }
  }

  showError(exc) {
    const message = exc instanceof ApiError ? exc.describe() : String(exc?.message || exc);
    text(this.error, message);
    this.error.hidden = false;
    const name = exc instanceof FieldError ? exc.field : FIELD_INPUTS[exc?.field];
    const input = name ? this.form.elements[name] : null;
    if (!input) return;
    const note = document.getElementById(`${input.id}-error`);
    text(note, exc.message);
    note.hidden = false;
    input.setAttribute("aria-invalid", "true");
    const described = (input.getAttribute("aria-describedby") || "").split(/\s+/).filter(Boolean);
    if (!described.includes(note.id)) input.setAttribute("aria-describedby", [note.id, ...described].join(" "));
    this.details.open = true;
    input.focus();
  }

  clearField(input) {
    input.removeAttribute("aria-invalid");
    const note = document.getElementById(`${input.id}-error`);
    if (note) {
      note.hidden = true;
      text(note, "");
      const described = (input.getAttribute("aria-describedby") || "").split(/\s+/).filter((id) => id && id !== note.id);
      if (described.length) input.setAttribute("aria-describedby", described.join(" "));
      else input.removeAttribute("aria-describedby");
    }
  }

  clearErrors() {
    this.error.hidden = true;
    text(this.error, "");
    for (const input of this.form.querySelectorAll("[aria-invalid=true]")) this.clearField(input);
  }
}

// An optional whole number within [min, max]; null when empty.
function integer(raw, field, label, min, max) {
  if (!raw) return null;
  const n = Number(raw);
  const bound = Number.isSafeInteger(max) ? ` and ${max}` : "";
  if (!Number.isSafeInteger(n) || n < min || (Number.isSafeInteger(max) && n > max)) {
    throw new FieldError(field, `${label} must be a whole number${bound ? ` between ${min}${bound}` : ` of at least ${min}`}.`);
  }
  return n;
}
