"""Issue 11, defect 5: the ApiServerSource posts the whole Job, and a Job carries the task twice.

A 64 KiB prompt (the most a task may have) of quotes and newlines, escaped once into the task's
JSON annotation and again into the Job's JSON, made a Job event over the 256 KiB every function
read: `job_finished` answered 413 (never retried) and the task's end was dead-lettered. It now
reads up to 2 MiB (a Kubernetes object is at most ~1.5 MiB); the other functions keep 256 KiB.
"""

from __future__ import annotations

import json

from agent import contract
from functions.core import factory
from functions.core.cloudevent import MAX_BODY_BYTES
from functions.core.settings import Settings
from functions.core.task import MAX_PROMPT_BYTES, parse_task

SUBMITTED = contract.EVENT_TASK_SUBMITTED
WORST_PROMPT = ('"\n\\' * MAX_PROMPT_BYTES)[: MAX_PROMPT_BYTES - 1]  # every character escaped, twice


async def test_the_job_of_the_largest_task_is_read_and_its_end_recorded(post, bus, runtime):
    data = {"prompt": WORST_PROMPT, "task_id": "t-big"}
    assert (await post("task_submitted", SUBMITTED, data)).status_code == 200
    rendered = factory.render_job(parse_task(data, source="test", event_id="1"), Settings())
    job = {**rendered, "metadata": {**rendered["metadata"], "uid": runtime.uids["t-big"]},
           "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    runtime.finished_jobs["t-big"] = job
    assert len(json.dumps({"data": job}).encode()) > MAX_BODY_BYTES  # what used to be a 413

    answered = await post("job_finished", contract.EVENT_JOB_UPDATE, job, mode="structured")
    assert answered.status_code == 200, answered.text[:300]
    assert (await bus.registry.get("t-big"))["state"] == contract.STATE_FINISHED


async def test_job_events_still_have_a_limit_and_other_functions_keep_theirs(post):
    huge = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x", "annotations": {"a": "x" * (2 * 1024 * 1024)}}}
    too_large = await post("job_finished", contract.EVENT_JOB_UPDATE, huge)
    assert too_large.status_code == 413 and too_large.json()["field"] == "body"
    submit = await post("task_submitted", SUBMITTED, {"prompt": "x", "notes": "y" * (MAX_BODY_BYTES + 1)})
    assert submit.status_code == 413
