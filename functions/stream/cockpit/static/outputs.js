// A tool call's output in the trace: head and tail with what was cut between, a link to the
// full output, and copy buttons.
//
// Invariants:
// - Output reaches the page only as text (dom.js), never as markup.
// - The cut is the true size minus what is shown, in bytes (UTF-8), as the agent counted
//   `output_bytes`; an event without the head/tail fields (older agents) shows `result` as it is.
// - The full-output link is given only when the agent kept the file (`output_file`).
// - A scrollable <pre> is focusable (tabindex=0) so a keyboard can scroll it.

import { h } from "./dom.js";

const encoder = new TextEncoder();

function bytes(value) {
  return encoder.encode(value).length;
}

// {head, tail, cut} from a tool's end event; cut is null when nothing was cut.
export function outputParts(data) {
  const head = typeof data.output_head === "string" ? data.output_head : null;
  if (head === null) return { head: String(data.result ?? data.error ?? ""), tail: "", cut: null };
  const tail = typeof data.output_tail === "string" ? data.output_tail : "";
  const total = Number.isSafeInteger(data.output_bytes) && data.output_bytes >= 0 ? data.output_bytes : null;
  const cut = total === null ? null : Math.max(0, total - bytes(head) - bytes(tail));
  return { head, tail, cut, total };
}

export function outputHref(taskId, callId) {
  return `api/tasks/${encodeURIComponent(taskId)}/outputs/${encodeURIComponent(callId)}`;
}

export function scrollablePre(value, label, cls = "") {
  return h("pre", { class: cls || null, tabindex: "0", "aria-label": label }, value);
}

// The output block inside a tool call's <details>.
export function toolOutput(data, taskId, name) {
  const { head, tail, cut, total } = outputParts(data);
  const parts = [scrollablePre(head, `${name} output${tail ? " (head)" : ""}`, "out-head")];
  if (tail) {
    const gap = cut ? `… ${cut.toLocaleString("en")} bytes cut …` : "…";
    parts.push(h("p", { class: "out-cut" }, gap));
    parts.push(scrollablePre(tail, `${name} output (tail)`, "out-tail"));
  }
  const tools = [copyButton(() => [head, tail].filter(Boolean).join("\n"), `Copy result of ${name}`, "copy result")];
  if (typeof data.output_file === "string" && data.output_file && typeof data.call_id === "string") {
    const note = total ? ` (${total.toLocaleString("en")} bytes)` : "";
    tools.unshift(h("a", { class: "full-output", href: outputHref(taskId, data.call_id), target: "_blank", rel: "noopener" }, `full output${note}`));
  }
  return [...parts, h("div", { class: "out-tools" }, tools)];
}

// A button that copies what `read()` returns; its label says when that worked.
export function copyButton(read, label, caption = "copy") {
  const button = h("button", { type: "button", class: "copy", "aria-label": label, title: label }, caption);
  button.addEventListener("click", async (e) => {
    e.preventDefault(); // inside a <summary> a click would also toggle the <details>
    e.stopPropagation();
    let said = "copied";
    try {
      await navigator.clipboard.writeText(read());
    } catch {
      said = "copy failed";
    }
    button.textContent = said;
    setTimeout(() => {
      button.textContent = caption;
    }, 1500);
  });
  return button;
}
