// Retry and fork (issue 12, contract D), and the download links of a task (contract B).
//
// Both submit `dev.dockyard.task.submitted` through api.js's own path (sendEvent), so the
// cockpit's ingress choice (dev's `/`, the cluster's relay) and its error answers apply:
//   retry: {from: {task_id, workspace: "fresh"}}
//   fork:  {from: {task_id, snapshot?}, prompt}
// Every href is relative to the page and built from encodeURIComponent'ed parts.

import { EVENT_TASK_SUBMITTED, getJSON, sendEvent, submittedTaskId } from "./api.js";

export async function retryTask(taskId) {
  const { event, body } = await sendEvent(EVENT_TASK_SUBMITTED, { from: { task_id: taskId, workspace: "fresh" } });
  return submittedTaskId(event, body);
}

export async function forkTask(taskId, prompt, snapshot) {
  const from = { task_id: taskId };
  if (snapshot) from.snapshot = snapshot;
  const { event, body } = await sendEvent(EVENT_TASK_SUBMITTED, { from, prompt });
  return submittedTaskId(event, body);
}

function taskPath(taskId) {
  return `api/tasks/${encodeURIComponent(taskId)}`;
}

export const ARTIFACTS = [
  ["changes.patch", "the change set as a patch"],
  ["changes.json", "the changed files with line counts"],
  ["workspace.tar.gz", "the final workspace"],
  ["result.json", "the agent's result"],
];

export function artifactHref(taskId, name) {
  return `${taskPath(taskId)}/${name}`;
}

// The last part of a storage key: a checkpoint snapshot's name.
export function keyName(key) {
  return String(key).split("/").filter(Boolean).pop() || String(key);
}

// Where a stored key downloads from, or null for a key no route serves.
export function keyHref(taskId, key) {
  const k = String(key);
  if (k.includes("/checkpoints/")) return `${taskPath(taskId)}/snapshots/${encodeURIComponent(keyName(k))}`;
  if (k.includes("/final/")) {
    const name = keyName(k);
    if (ARTIFACTS.some(([n]) => n === name)) return artifactHref(taskId, name);
  }
  return null;
}

// The task's snapshots [{name, key, size}], from the server's list, else from the record's keys.
export async function listSnapshots(taskId, record) {
  try {
    const listed = await getJSON(`${taskPath(taskId)}/snapshots`);
    if (Array.isArray(listed)) return listed.filter((s) => s && typeof s.key === "string");
  } catch {
    /* an older server: the record's keys say the same, without sizes */
  }
  const keys = Array.isArray(record?.snapshot_keys) ? record.snapshot_keys : [];
  return keys.filter((k) => typeof k === "string" && k.includes("/checkpoints/")).map((key) => ({ name: keyName(key), key, size: null }));
}
