"""Each task's Job as a podman pod (`DOCKYARD_RUNTIME=podman`, `dockyard dev --runtime podman`).

The package, imports one way (top to bottom):
    runtime     PodmanRuntime: LocalRuntime's Job controller with podman pods; settings the Job is rendered with
    pod         one task's attempts: the pod made, its containers run as the kubelet runs them, the agent's end
    translate   the rendered Job as podman arguments (one function), and the list of what podman cannot express
    oom         the kernel's OOM notification where podman misses it (cgroup v1)
    cli         the podman command from asyncio, with the runtime's containers.conf
"""

from functions.runtime.podman.runtime import PodmanRuntime

__all__ = ["PodmanRuntime"]
