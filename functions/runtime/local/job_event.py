"""The finished Job, and the CloudEvent that carries it, as the cluster would send them.

Invariant: the end of a local task is reported as a `batch/v1` Job object in a
`dev.knative.apiserver.resource.update` CloudEvent (ApiServerSource, Resource
mode), in exactly the shape `job_finished` reads, so that function runs the
same code here as in the cluster. Both are pure functions of the persisted
state: a redelivery after a restart sends the same event (same id).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent import contract
from functions.core.task import Task
from functions.runtime.local.state import SupervisorState

# Job condition reasons, as the Job controller writes them.
REASON_COMPLETE = "CompletionsReached"
REASON_BACKOFF = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_FAILURE_POLICY = "PodFailurePolicy"
REASON_CANCELLED = "Cancelled"  # local only: a Job is deleted, a local task is stopped


def kube_time(ts: float) -> str:
    """A Kubernetes timestamp (RFC 3339, whole seconds, UTC), as the API server writes them."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_object(state: SupervisorState, task: Task) -> dict:
    """The Job as ApiServerSource would send it once finished."""
    complete = state.reason == REASON_COMPLETE
    finished_at = state.finished_at or state.created_at
    condition = {
        "type": "Complete" if complete else "Failed",
        "status": "True",
        "reason": state.reason,
        "message": state.message,
        "lastProbeTime": kube_time(finished_at),
        "lastTransitionTime": kube_time(finished_at),
    }
    status: dict[str, Any] = {
        "conditions": [condition],
        "active": 0,
        "succeeded": 1 if complete else 0,
        "failed": max(len(state.exit_codes) - (1 if complete else 0), 0),
        "startTime": kube_time(state.started_at or state.created_at),
    }
    if complete:
        status["completionTime"] = kube_time(finished_at)
    if state.termination_message:
        status["terminationMessage"] = state.termination_message
    if state.agent_exit:  # as KubernetesRuntime puts the pod's agent container end on the Job
        status["agentExit"] = dict(state.agent_exit)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": contract.job_name(state.task_id),
            "namespace": contract.AGENTS_NAMESPACE,
            "uid": state.uid,
            "creationTimestamp": kube_time(state.created_at),
            "labels": contract.agent_labels(state.task_id),
            "annotations": {contract.ANNOTATION_TASK: task.to_json()},
        },
        "spec": {
            "backoffLimit": task.limits.retries,
            "activeDeadlineSeconds": task.limits.deadline_seconds,
        },
        "status": status,
    }


def job_event(state: SupervisorState, task: Task) -> dict:
    """A structured-mode CloudEvent (as a dict) carrying the finished Job."""
    name = contract.job_name(state.task_id)
    return {
        "specversion": "1.0",
        "id": f"{state.uid}-finished",  # the same on every redelivery
        "source": contract.EVENT_SOURCE_LOCAL_RUNTIME,
        "type": contract.EVENT_JOB_UPDATE,
        "subject": f"/apis/batch/v1/namespaces/{contract.AGENTS_NAMESPACE}/jobs/{name}",
        "time": kube_time(state.finished_at or state.created_at),
        "datacontenttype": "application/json",
        "kind": "Job",
        "name": name,
        "namespace": contract.AGENTS_NAMESPACE,
        "data": job_object(state, task),
    }
