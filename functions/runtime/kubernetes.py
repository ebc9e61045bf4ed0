"""Agents as Kubernetes Jobs: the Job `agent-<id>`, then (with NATS credentials) the Secret `agent-<id>`,
then the PVC `workspace-<id>`, both owned by the Job.

Invariants
- Idempotent by name, with the API server as the arbiter: a create answered 409
  AlreadyExists reads the Job; if it is ours (managed-by dockyard, and the task in
  its annotation equals this task) the launch is a redelivery, and a PVC that is
  still missing (a launch cut short between the two creates) is created now.
  Another spec under the same id is a LaunchConflict.
- The PVC carries the UID of the Job that exists, read from the API's answer, so
  deleting the Job (propagation Background) or its TTL takes the workspace along.
- With an account signing key (`Settings.nats_issuer()`), each launch mints the task's
  agent and snapshotter NATS users and creates the Secret `agent-<id>` holding them,
  owned by the Job as the PVC is. Created after the Job (its UID is the owner) and
  before the PVC, so the PVC stays the last step: a launch cut short before the Secret
  creates it on redelivery; a Secret already there (409) was made by an earlier or a
  concurrent delivery and is kept. The pod may be scheduled before the Secret exists:
  the kubelet retries the (non-optional) secret volume's mount until it appears.
- Errors are sorted once, in `_call`: 400/401/403/404/422 are non-transient (the
  message says what to fix), 429, 5xx, timeouts and connection errors transient; so is
  a body the client's models refuse before sending (a field it does not know).
- Every create asks for `fieldValidation=Strict`: a field the API server does not know
  (e.g. one newer than the cluster) is a 400 naming it, never silently dropped.
- The official client is synchronous; every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Callable

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError as Urllib3Error

from agent import contract
from functions.core import factory
from functions.core.nats_jwt import TASK_ROLES, task_credentials_expiry
from functions.core.settings import Settings
from functions.errors import ApiRejected, ApiUnavailable, LaunchConflict, TaskNotFound
from functions.errors import BadInput, SettingsError
from functions.core.task import Task

log = logging.getLogger("dockyard.runtime.kubernetes")


class _Answer(Exception):
    """An API answer the caller handles itself (e.g. 409 on create, 404 on read)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def load_api_client() -> "client.ApiClient":
    """In a pod (KUBERNETES_SERVICE_HOST is set): the ServiceAccount; elsewhere: the kubeconfig
    ($KUBECONFIG, read now: the client reads it once, at import)."""
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    except config.ConfigException as exc:
        raise SettingsError(
            f"DOCKYARD_RUNTIME=kubernetes, but no Kubernetes configuration was found ({exc}): run in a pod "
            "with a ServiceAccount, or point KUBECONFIG at a kubeconfig"
        ) from None
    return client.ApiClient(configuration)


class KubernetesRuntime:
    """The Runtime for a cluster: one Job and one PVC per task in `settings.namespace`."""

    def __init__(self, settings: Settings, api_client: "client.ApiClient | None" = None, *, request_timeout: float = 30.0):
        self.settings = settings
        # Checked now, when the runtime is made: a signing key that cannot sign is a SettingsError naming the variable.
        self.issuer = settings.nats_issuer()
        self._owns_client = api_client is None
        self.api_client = api_client or load_api_client()
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.request_timeout = request_timeout

    async def close(self) -> None:
        if self._owns_client:
            self.api_client.close()

    # --- the Runtime protocol ------------------------------------------------

    async def launch(self, task: Task) -> bool:
        """True if this call completed the launch: it created the workspace PVC, the last step (of a Job it
        created, or of an existing one whose launch was cut short). Of concurrent deliveries exactly one
        creates the PVC, so exactly one answers True."""
        if task.repo and task.repo["url"].lower().startswith("file:"):
            raise BadInput("repo.url: file:// repositories are never cloned in the cluster; use https or ssh", "repo.url")
        ns, name = self.settings.namespace, contract.job_name(task.task_id)
        try:
            job = await self._call(
                f"create Job {ns}/{name}", self.batch.create_namespaced_job, ns, factory.render_job(task, self.settings),
                field_validation="Strict", expect=(409,),
            )  # fmt: skip
            created = True
        except _Answer:
            job = await self._existing_job(task)
            created = False
        uid = job["metadata"]["uid"]
        await self._create_nats_secret(task, uid)
        pvc = factory.render_pvc(task, self.settings, uid)
        try:
            await self._call(
                f"create PersistentVolumeClaim {ns}/{pvc['metadata']['name']}", self.core.create_namespaced_persistent_volume_claim,
                ns, pvc, field_validation="Strict", expect=(409,),
            )  # fmt: skip
        except _Answer:
            return False  # the PVC is there: an earlier or a concurrent delivery completed the launch
        if created:
            log.info("launched task %s: Job %s/%s (uid %s) and its workspace", task.task_id, ns, name, uid)
        else:
            log.info("completed the launch of task %s: created the missing workspace of Job %s/%s", task.task_id, ns, name)
        return True

    async def finished_job(self, task_id: str) -> dict | None:
        try:
            job = await self._read_job(task_id)
        except TaskNotFound:
            return None
        # Only the terminal conditions: since Kubernetes 1.31 `FailureTarget`/`SuccessCriteriaMet` come
        # first, while the pod (and its snapshotter's final upload) is still terminating.
        finished = any(
            c.get("type") in ("Complete", "Failed") and str(c.get("status")) == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )
        if not finished:
            return None
        return await self._with_last_gasp(job, task_id)

    async def _with_last_gasp(self, job: dict, task_id: str) -> dict:
        """The Job, with its agent container's end put on it as the local runtime puts it: a Job carries
        no termination message (the Pod does). From the newest pod's agent container: `status.terminationMessage`
        (its own, or its last log lines: `FallbackToLogsOnError`) and `status.agentExit` (reason such as
        `OOMKilled`, exit code, signal). Best effort: without the pods, the end is recorded all the same."""
        ns = self.settings.namespace
        selector = f"{JOB_NAME_LABEL}={contract.job_name(task_id)}"
        try:
            pods = await self._call(f"list Pods of Job {ns}/{contract.job_name(task_id)}", self.core.list_namespaced_pod, ns,
                                    label_selector=selector)
        except (ApiRejected, ApiUnavailable) as exc:
            log.warning("task %s: no last words from its pods: %s", task_id, exc)
            return job
        terminated = _agent_terminated(pods.get("items") or [])
        if terminated is None:
            return job
        status = dict(job.get("status") or {})
        message = (terminated.get("message") or "").strip()
        if message and not status.get("terminationMessage"):
            status["terminationMessage"] = message
        status["agentExit"] = {key: terminated[key] for key in ("reason", "exitCode", "signal") if terminated.get(key) is not None}
        return {**job, "status": status}

    async def job_uid(self, task_id: str) -> str | None:
        try:
            job = await self._read_job(task_id)
        except TaskNotFound:
            return None
        uid = (job.get("metadata") or {}).get("uid")
        return uid if isinstance(uid, str) and uid else None

    async def cancel(self, task_id: str) -> None:
        """Delete the Job; Background propagation deletes its pods (SIGTERM, grace period: the
        snapshotter's final upload) and, through its ownerReference, the workspace PVC."""
        if not contract.is_valid_task_id(task_id):
            raise TaskNotFound(f"no task {task_id!r}: not a valid task id")
        ns, name = self.settings.namespace, contract.job_name(task_id)
        try:
            await self._call(
                f"delete Job {ns}/{name}", self.batch.delete_namespaced_job, name, ns,
                propagation_policy="Background", expect=(404,),
            )  # fmt: skip
        except _Answer:
            raise TaskNotFound(f"no task {task_id}: Job {ns}/{name} does not exist") from None
        log.info("cancelled task %s: deleted Job %s/%s", task_id, ns, name)

    # --- helpers ---------------------------------------------------------------

    async def _create_nats_secret(self, task: Task, job_uid: str) -> None:
        """The task's NATS users, minted now, in the Secret `agent-<id>` owned by the Job; kept if it exists."""
        if self.issuer is None:
            return
        # The Job's activeDeadlineSeconds bounds every attempt, so deadline + margin from now covers them all.
        # Not a Job that Kueue keeps suspended longer than the margin: its clock starts only when admitted.
        expires_at = task_credentials_expiry(task.limits.deadline_seconds, time.time())
        creds = {role: self.issuer.task_creds(task.task_id, role, expires_at=expires_at) for role in TASK_ROLES}
        secret = factory.render_nats_secret(task, self.settings, job_uid, creds)
        ns, name = self.settings.namespace, secret["metadata"]["name"]
        try:
            await self._call(
                f"create Secret {ns}/{name}", self.core.create_namespaced_secret, ns, secret,
                field_validation="Strict", expect=(409,),
            )  # fmt: skip
        except _Answer:
            pass  # an earlier or concurrent delivery created it (after the same Job): its users are as good

    async def _read_job(self, task_id: str) -> dict:
        if not contract.is_valid_task_id(task_id):
            raise TaskNotFound(f"no task {task_id!r}: not a valid task id")
        ns, name = self.settings.namespace, contract.job_name(task_id)
        try:
            return await self._call(f"read Job {ns}/{name}", self.batch.read_namespaced_job, name, ns, expect=(404,))
        except _Answer:
            raise TaskNotFound(f"no task {task_id}: Job {ns}/{name} does not exist") from None

    async def _existing_job(self, task: Task) -> dict:
        """The Job that answered AlreadyExists, if it runs this very task; else LaunchConflict."""
        try:
            job = await self._read_job(task.task_id)
        except TaskNotFound:
            # Deleted between our create and this read (e.g. its TTL): the next delivery creates it.
            raise ApiUnavailable(f"Job {contract.job_name(task.task_id)} vanished while launching; retry") from None
        meta = job.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(contract.LABEL_MANAGED_BY) != contract.MANAGED_BY:
            raise LaunchConflict(
                f"a Job named {meta.get('name')} that dockyard does not manage exists in {self.settings.namespace}; "
                "delete it or submit the task under another task_id"
            )
        if meta.get("deletionTimestamp"):
            raise ApiUnavailable(f"Job {meta.get('name')} of an earlier launch is being deleted; retry once it is gone")
        if _annotated_task(meta) != task.to_dict():
            raise LaunchConflict(
                f"task {task.task_id} already exists with a different spec; "
                "choose another task_id (or omit it to have one derived from the event)"
            )
        return job

    async def _call(self, what: str, method: Callable[..., Any], *args: Any, expect: tuple[int, ...] = (), **kwargs: Any) -> dict:
        """`method(*args, **kwargs)` in a thread, its JSON answer as a dict. An error status in
        `expect` is raised as `_Answer`; every other failure as an ApiRejected or ApiUnavailable saying what to do."""

        def call() -> dict:
            response = method(*args, _preload_content=False, _request_timeout=self.request_timeout, **kwargs)
            try:
                return json.loads(response.data or b"{}")
            finally:
                response.release_conn()

        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status in expect:
                raise _Answer(exc.status) from None
            raise self._error(what, exc.status, _status_body(exc)) from None
        except (Urllib3Error, OSError) as exc:  # timeouts, refused or reset connections, DNS
            raise ApiUnavailable(f"{what}: the Kubernetes API did not answer ({exc}); retry later") from None
        except ValidationError as exc:  # the client checks a body against its models before sending it
            raise ApiRejected(
                f"{what} was refused by the Kubernetes client before sending: {_first_error(exc)}. Fix the Job settings "
                "(`dockyard manifests job` prints what is sent)",
            ) from None

    def _error(self, what: str, status: int | None, body: dict) -> ApiRejected | ApiUnavailable:
        ns = self.settings.namespace
        detail = body.get("message") or body.get("reason") or "no details"
        if status == 403 and "exceeded quota" in detail:
            # A ResourceQuota frees up as other tasks finish.
            return ApiUnavailable(f"{what}: {detail}; retry once other tasks in {ns} have finished", status)
        if status == 403:
            return ApiRejected(
                f"{what} was forbidden: {detail}. The functions' ServiceAccount needs create, get and delete on jobs, "
                f"update on jobs/finalizers, create on persistentvolumeclaims, create on secrets and list on pods in namespace {ns}: "
                "apply the RBAC in knative/",
                status,
            )
        if status == 401:
            return ApiRejected(f"{what}: the API server rejected the credentials: {detail}; check the kubeconfig or ServiceAccount token", status)
        if status == 422:
            return ApiRejected(
                f"{what} was rejected as invalid: {detail}. Fix the Job settings (the DOCKYARD_* variables of the "
                "functions; `dockyard manifests job` prints what is sent)",
                status,
            )
        if status == 400:
            return ApiRejected(f"{what} was a bad request: {detail}. Check that the cluster supports the fields dockyard sends (Kubernetes 1.29+)", status)
        if status == 404:
            return ApiRejected(f"{what}: not found: {detail}. Does namespace {ns} exist? Apply knative/ first", status)
        if status == 429 or status is None or status == 0 or status >= 500:
            return ApiUnavailable(f"{what}: the Kubernetes API answered {status or 'nothing'}: {detail}; retry later", status)
        return ApiRejected(f"{what}: the Kubernetes API answered {status}: {detail}", status)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"][1:])  # loc[0] is the argument's position
    return f"{where}: {error['msg']}"


def _status_body(exc: ApiException) -> dict:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except ValueError:
        return {"message": str(exc.body)[:500]}
    return body if isinstance(body, dict) else {}


def _annotated_task(meta: dict) -> dict | None:
    raw = (meta.get("annotations") or {}).get(contract.ANNOTATION_TASK)
    try:
        return json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on a Job's pods by the Job controller (1.27+)


def _agent_terminated(pods: list[dict]) -> dict | None:
    """The agent container's last `terminated` state in the newest pod that has one."""
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != factory.CONTAINER_AGENT:
                continue
            for state in (container.get("state") or {}, container.get("lastState") or {}):
                if isinstance(state.get("terminated"), dict):
                    return state["terminated"]
    return None
