"""PodmanRuntime: the Runtime of `dockyard dev --runtime podman`: each task's pod from the rendered Job, in podman.

It is the local runtime with another `Pod`: admission, attempts, backoff, the deadline, persisted state,
idempotent launch by task id and job-event delivery are LocalRuntime's (functions.runtime.local); the
rules come from the rendered Job (`JobSpec.from_job`) and each attempt is that Job's pod (pod.py).

Invariants
- The Job is rendered by `functions.core.factory.render` with `pod_settings(settings)`: the same
  settings with every URL that names this machine's loopback naming `podman_host` instead (what the
  pod's network, slirp4netns with the host's loopback, reaches it as). Nothing is rewritten after rendering.
- The Secrets the Job mounts come from where `dockyard dev` keeps them: the object store's and the
  model's from directories (one file per key: `object_store_secret_dir`, `model_secret_dir`, and the git
  credentials of `repo.push` from `git_credentials_dir`, mounted into a pushing task's snapshotter only), the
  task's NATS users minted at admission (as LocalRuntime mints them) into the Secret the factory renders.
- The workspace is the named volume `workspace-<id>`, bound to the task's folder (so the result file,
  the TTL janitor and a restart see it as the local runtime does); it is removed with the workspace.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent import contract
from functions.core import factory
from functions.core.settings import Settings
from functions.errors import SettingsError
from functions.runtime.local.processes import AgentCommand
from functions.runtime.local.runtime import LocalRuntime
from functions.runtime.local.supervisor import EmitJobEvent, TaskSupervisor
from functions.runtime.podman.cli import Podman, default_containers_conf
from functions.runtime.podman.pod import PodmanPod
from functions.runtime.podman.translate import plan

log = logging.getLogger("dockyard.runtime.podman")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
URL_SETTINGS = ("nats_url", "nats_leaf_url", "s3_endpoint", "egress_proxy")


def pod_settings(settings: Settings) -> Settings:
    """The settings the pod's Job is rendered with: loopback URLs name the podman host instead."""
    if settings.store.startswith("file:"):
        var = Settings.variable("store")
        raise SettingsError(f"{var}={settings.store}: the podman runtime needs an object store the pods reach (s3://...)", var)
    update = {}
    for name in URL_SETTINGS:
        value = getattr(settings, name)
        parts = urlsplit(value) if value else None
        if parts is not None and parts.hostname in LOOPBACK_HOSTS:
            netloc = parts.netloc.rsplit("@", 1)
            host = settings.podman_host + (f":{parts.port}" if parts.port else "")
            update[name] = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
    return settings.model_copy(update=update)


def read_secret_dir(path: str) -> dict[str, bytes] | None:
    """A Secret as a directory holds it: one file per key (dot files skipped); None when there is none."""
    if not path or not Path(path).is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file() and not p.name.startswith(".")}


class PodmanRuntime(LocalRuntime):
    def __init__(self, settings: Settings, emit_job_event: EmitJobEvent, *, podman: Podman | None = None, **kw: Any):
        self.settings = settings
        self.job_settings = pod_settings(settings)
        scratch = Path(settings.data_dir).resolve() / "podman"
        scratch.mkdir(parents=True, exist_ok=True)
        self.podman = podman or Podman(settings.podman_binary, settings.podman_containers_conf or default_containers_conf(), scratch)
        kw.setdefault("grace_seconds", settings.termination_grace_seconds)
        kw.setdefault("ttl_succeeded_seconds", settings.ttl_succeeded_seconds)
        kw.setdefault("ttl_failed_seconds", settings.ttl_failed_seconds)
        kw.setdefault("issuer", settings.nats_issuer())
        kw.setdefault("nats_creds", settings.nats_creds)
        kw.setdefault("max_running", settings.max_running or None)
        for unused in ("agent_cmd", "default_model", "secrets_dir", "model_gateway", "gateway_grants", "scripts_dir",
                       "allow_file_repos", "env", "git_credentials_dir"):  # the pod's Job says all that; the dev stack passes them to any runtime
            kw.pop(unused, None)
        super().__init__(settings.data_dir, settings.nats_url, settings.store, emit_job_event, warm=False, **kw)
        # LocalRuntime mints a task's NATS users at admission when its command takes them; here they go into the Job's Secret.
        self.policy.command = AgentCommand((), settings.store, nats_url=settings.nats_url, nats_creds=self.issuer is not None)
        self.policy.make_pod = self._make_pod

    # --- the pod of a task ------------------------------------------------------------

    def _make_pod(self, sup: TaskSupervisor):
        task, state = sup.task, sup.state
        spec = plan(factory.render(task, self.job_settings, state.uid, self._placeholder_creds()), self._secrets(), **self._where(sup)).spec

        def make_plan():
            return plan(factory.render(task, self.job_settings, state.uid, self._creds(sup)), self._secrets(), **self._where(sup))

        pod = PodmanPod(sup, self.podman, make_plan, spec, lambda: self.folders.read_result(state.task_id).get("summary"))
        return pod, spec

    def _where(self, sup: TaskSupervisor) -> dict:
        return {"workspace_dir": str(sup.folder.workspace), "files_dir": str(PodmanPod.files_dir(sup.folder.root)),
                "network": self.settings.podman_network}

    def _placeholder_creds(self) -> dict[str, str] | None:
        return {role: "-" for role in factory.NATS_ROLES} if factory.mints_nats_credentials(self.job_settings) else None

    def _creds(self, sup: TaskSupervisor) -> dict[str, str] | None:
        """The task's NATS users as minted at admission (LocalRuntime._mint_credentials)."""
        if not factory.mints_nats_credentials(self.job_settings):
            return None
        return {role: sup.folder.nats_creds(role).read_text() for role in factory.NATS_ROLES}

    def _secrets(self) -> dict[str, dict[str, bytes]]:
        """The Secrets the Job mounts, from their directories; the object store's is empty without one (the pods
        then have no S3 credentials; a mounted empty Secret, as an empty directory)."""
        found = {
            self.settings.object_store_secret: read_secret_dir(self.settings.object_store_secret_dir) or {},
            self.settings.model_secret: read_secret_dir(self.settings.model_secret_dir),
            self.settings.git_push_secret: read_secret_dir(self.settings.git_credentials_dir),
        }
        return {name: data for name, data in found.items() if data is not None}

    # --- lifecycle --------------------------------------------------------------------

    async def sweep(self) -> None:
        """LocalRuntime's sweep, then the pods and volumes of tasks whose workspace it removed."""
        await super().sweep()
        for task_id in self.folders.task_ids():
            state = self.folders.load(task_id)
            if state is not None and state.workspace_removed and task_id not in self._supervised:
                await self.remove_pod(task_id)

    async def remove_pod(self, task_id: str) -> None:
        """The task's pod and its workspace volume (the host folder behind it is LocalRuntime's)."""
        await self.podman.run("pod", "rm", "--force", "--time", "0", contract.job_name(task_id), check=False)
        await self.podman.run("volume", "rm", "--force", contract.pvc_name(task_id), check=False)
