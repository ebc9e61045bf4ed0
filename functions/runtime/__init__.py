"""Where agents run: `make_runtime` picks the implementation named by `Settings.runtime`.

Invariant: a runtime gets its settings from the caller (read once at start), never from the environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from functions.core.runtime_api import Runtime
    from functions.core.settings import Settings


def make_runtime(settings: "Settings", **kw: Any) -> "Runtime":
    """The runtime for this process. `kw` goes to the implementation's constructor
    (for the local and podman ones: `emit_job_event` is required, `agent_cmd` and the timings are optional)."""
    if settings.runtime == "local":
        from functions.runtime.local import LocalRuntime

        kw.setdefault("ttl_succeeded_seconds", settings.ttl_succeeded_seconds)
        kw.setdefault("ttl_failed_seconds", settings.ttl_failed_seconds)
        kw.setdefault("scripts_dir", settings.scripts_dir or None)
        kw.setdefault("allow_file_repos", settings.allow_file_repos)
        kw.setdefault("issuer", settings.nats_issuer())
        kw.setdefault("nats_creds", settings.nats_creds)
        kw.setdefault("max_running", settings.max_running or None)  # 0: the number of cores
        kw.setdefault("git_credentials_dir", settings.git_credentials_dir or None)  # the snapshotter's only
        return LocalRuntime(settings.data_dir, settings.nats_url, settings.store, **kw)
    if settings.runtime == "kubernetes":
        from functions.runtime.kubernetes import KubernetesRuntime

        return KubernetesRuntime(settings, **kw)
    if settings.runtime == "podman":
        from functions.runtime.podman import PodmanRuntime

        return PodmanRuntime(settings, **kw)
    raise ValueError(f"DOCKYARD_RUNTIME={settings.runtime!r}: use 'local', 'kubernetes' or 'podman'")
