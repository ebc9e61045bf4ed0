"""Agents as child processes on this machine: the pod, mirrored (the Runtime of `dockyard dev`).

The package, imports one way (top to bottom):
    runtime        LocalRuntime: launch, cancel, finished_job, resume after a restart, the TTL janitor
    supervisor     one task's Job controller: attempts, retries with backoff, deadline, the job event
    admission      at most N tasks run at once, the rest wait in submit order
    pod            the seam: where an attempt's containers run (a Pod) and the Job rules it obeys (JobSpec);
                   functions.runtime.podman plugs its podman pods in here
    status_events  the runtime's own status events (queued, retrying) on NATS
    processes      restore, snapshotter and agent as child processes in their own process groups (LocalPod)
    template       the warm template: restore and the agent forked pre-imported, their exit statuses
    job_event      the finished Job and the ApiServerSource CloudEvent carrying it
    state          a task's folder and `supervisor.json`, written atomically
    clock          the Clock every wait and persisted time goes through (a test injects its own)
"""

from functions.runtime.local.clock import Clock
from functions.runtime.local.runtime import LocalRuntime

__all__ = ["Clock", "LocalRuntime"]
