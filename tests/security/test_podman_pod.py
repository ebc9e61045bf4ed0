"""Attack: code in the agent container of a podman pod (`dockyard dev --runtime podman`) looks around.

The stand-in agent (tests/functions/runtime/test_podman_runtime.py) runs what a hostile command would: it
looks for the Secrets (the object store's, the model key, the NATS users: mounted only into restore,
snapshotter, gateway and nats-leaf), for the other containers' processes, writes to the image, and reads its
credentials and capabilities. docs/SECURITY.md ("Under the podman runtime") says what holds; this holds it.
"""

from __future__ import annotations

import json
import uuid

from tests.functions.runtime.test_podman_runtime import (  # noqa: F401 (fixtures)
    _cleanup,
    _run,
    _task,
    podman_ready,
    podman_settings,
    stand_in_image,
)


async def test_the_agent_container_sees_no_secret_no_other_process_and_cannot_write_its_image(podman_settings, stand_in_image):  # noqa: F811
    settings = podman_settings.updated({"agent_image": stand_in_image})
    task_id = f"probe-{uuid.uuid4().hex[:8]}"
    job, _, runtime = await _run(settings, _task(task_id, retries=0))
    try:
        probe = runtime.folder(task_id).workspace / "probe.json"  # the workspace volume, seen from the host
        assert probe.exists(), job["status"].get("terminationMessage")
        found = json.loads(probe.read_text())
        assert found["secrets_dir"] is False  # no Secret mounted in the agent container (the sidecars hold them)
        assert (found["uid"], found["gid"]) == (1000, 1000)
        assert int(found["cap_eff"], 16) == 0  # every capability dropped
        assert found["pids"] == [1]  # its own PID namespace: the sidecars' processes (and their files) are not in /proc
        assert found["root_write"] == "Read-only file system"
    finally:
        _cleanup(runtime, task_id)
