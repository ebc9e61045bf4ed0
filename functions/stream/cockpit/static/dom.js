// Building DOM from data without ever parsing it as HTML.
// Every string goes in as a text node or an attribute value: event data can hold
// anything (tool output, prompts) and must never become markup.

export const TASK_ID = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

export function isTaskId(value) {
  return typeof value === "string" && value.length >= 1 && value.length <= 40 && TASK_ID.test(value);
}

// h("li", {class: "x", dataset: {id: 3}, onclick: f}, "text", child, [more])
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") {
      for (const [k, v] of Object.entries(value)) if (v !== null && v !== undefined) el.dataset[k] = String(v);
    } else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child)); // strings become text nodes
  }
  return el;
}

export function text(el, value) {
  el.textContent = value === null || value === undefined ? "" : String(value);
  return el;
}

// One line, at most `width` characters, like functions/render.py's _one_line.
export function oneLine(value, width = 100) {
  const flat = String(value ?? "").split(/\s+/).filter(Boolean).join(" ");
  return flat.length <= width ? flat : flat.slice(0, width - 1) + "…";
}

export function compact(value, drop = []) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    value = Object.fromEntries(Object.entries(value).filter(([k]) => !drop.includes(k)));
  }
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

export function clock(ts) {
  const when = ts ? new Date(ts) : null;
  if (!when || Number.isNaN(when.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}`;
}

export function age(ts, now = Date.now()) {
  const when = ts ? Date.parse(ts) : NaN;
  if (Number.isNaN(when)) return "";
  const s = Math.max(0, Math.round((now - when) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}

// A duration in milliseconds for a person: 0.4s, 12.0s, 3m 05s, 2h 10m.
export function duration(ms) {
  const s = Math.max(0, Number(ms) || 0) / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const whole = Math.round(s);
  if (whole < 3600) return `${Math.floor(whole / 60)}m ${String(whole % 60).padStart(2, "0")}s`;
  return `${Math.floor(whole / 3600)}h ${String(Math.floor((whole % 3600) / 60)).padStart(2, "0")}m`;
}

export function size(bytes) {
  if (typeof bytes !== "number" || bytes <= 0) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) {
    bytes /= 1024;
    i += 1;
  }
  return i === 0 ? `${bytes} B` : `${bytes.toFixed(1)} ${units[i]}`;
}
