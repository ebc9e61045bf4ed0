"""A Kubernetes API server for tests: kmock's `KubernetesEmulator`, made to answer like a real one.

kmock stores objects in memory and serves them over real HTTP (aiohttp, in the
test's event loop), so the official `kubernetes` client talks to it unchanged.
What a real API server does and plain kmock does not, added here:

- create assigns `metadata.uid`, `resourceVersion`, `creationTimestamp`,
  `generation` and the namespace from the URL; every change bumps `resourceVersion`;
- a create runs the API server's steps in its order (kube_rules.py): decoding with
  `fieldValidation` (Strict: unknown fields are a 400 in the server's words; Warn, the default:
  a `Warning` header each; Ignore: silence; unknown fields are never stored), defaulting (the
  core/v1 and batch/v1 defaulters and the Job strategy's selector and labels), the namespace
  must exist (`namespaces`: else 404 `namespaces "x" not found`), validation (422 `Invalid`
  with `details.causes`: names, label keys and values, a Job's restartPolicy), then
  409 `AlreadyExists`;
- an update or patch carrying a `metadata.resourceVersion` other than the stored one is a
  409 `Conflict` ("the object has been modified; please apply your changes to the latest
  version and try again"); its unknown fields are handled as on create; a PUT replaces the
  object (keeping its status, or on /status only taking the status, and the system's metadata),
  a PATCH is a JSON merge patch (a strategic merge patch's lists are replaced, not merged);
  the result is validated (422);
- `dryRun=All` on create, update, patch and delete: everything above runs and the answer is
  given, nothing is stored or deleted;
- answers are proper `Status` bodies: 404 `NotFound` for a missing object, 400 `BadRequest`
  for a bad label selector or a namespace that contradicts the URL;
- deleting an object deletes its dependents (objects whose `ownerReferences`
  name its UID), recursively. `propagationPolicy: Orphan` keeps them and strips
  the reference; a Job deleted without a policy orphans, as batch/v1 does;
- lists honour `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`);
- `set_job_status()` plays the Job controller, `set_pod_status()` the kubelet; `job_reaches_target()` then
  `job_pods_gone()` play the 1.31+ controller's ending (`SuccessCriteriaMet`/`FailureTarget` first, the
  terminal `Complete`/`Failed` only once the pods are gone); `fail_next()` injects an error
  answer (or a delay) for the next matching request;
- authentication and RBAC, when given `tokens` (bearer token -> user) and `rbac` (an `Rbac` parsed from
  Role/ClusterRole and RoleBinding/ClusterRoleBinding YAML): every request is authenticated (no or an
  unknown token: 401) and authorized as the API server does, verb from method and path (GET one: get,
  GET collection: list, `?watch`: watch, POST: create, PUT: update, PATCH: patch, DELETE one: delete,
  DELETE collection: deletecollection), against the rules' apiGroups, resources (`jobs/status`:
  subresources), verbs and resourceNames; refused is a 403 `Forbidden` Status in the API server's words.
  With it, OwnerReferencesPermissionEnforcement: an ownerReference with `blockOwnerDeletion` needs `update`
  on the owner's `finalizers`. A user in `system:masters` (the tests' admin) may do anything. The test
  fixture (conftest_kube.py) binds knative/rbac.yaml: the runtime's client is the functions'
  ServiceAccount, so a call the Role does not grant fails its tests, and a grant no call needs fails
  tests/functions/runtime/test_kubernetes_rbac.py: the Role and the code cannot drift apart.

The client is synchronous: call it through `asyncio.to_thread` (as the runtime
does), or the test's event loop, which serves the HTTP, is blocked.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aiohttp.web
import attrs
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, action, resource

import kube_rules

JOBS = resource("batch", "v1", "jobs")
PVCS = resource("", "v1", "persistentvolumeclaims")
PODS = resource("", "v1", "pods")
SECRETS = resource("", "v1", "secrets")

# (resource, kind, group for Status details)
_KNOWN = {
    JOBS: ("Job", "batch"),
    PVCS: ("PersistentVolumeClaim", ""),
    PODS: ("Pod", ""),
    SECRETS: ("Secret", ""),
}
# batch/v1 Jobs orphan their dependents when deleted without a propagation policy.
_DEFAULT_ORPHANS = {JOBS}

_STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class Fault:
    """An answer to give instead of the normal one, once, to the next matching request."""

    verb: str  # "create", "fetch", "list", "update", "delete"
    plural: str  # "jobs", "persistentvolumeclaims", ...
    status: int | None = None  # None: no error, only the delay
    message: str = "injected by the test"
    reason: str | None = None
    delay: float = 0.0  # seconds before answering; without a status the request is carried out first


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _qualified(res: resource) -> str:
    group = _KNOWN.get(res, (None, res.group))[1]
    return f"{res.plural}.{group}" if group else str(res.plural)


def status_error(status: int, message: str, *, reason: str | None = None, res: resource | None = None, name: str | None = None) -> KubernetesError:
    """A `KubernetesError` rendered by kmock as a `Status` body with this code."""
    details: dict[str, Any] = {}
    if res is not None:
        group = _KNOWN.get(res, (None, res.group))[1]
        details = {"group": group, "kind": res.plural} if group else {"kind": res.plural}  # the core group is omitted
        if name:
            details["name"] = name
    return KubernetesError(status=status, reason=reason or _STATUS_REASONS.get(status, "Unknown"), message=message, details=details)


def invalid_error(res: resource, name: str, causes: list[kube_rules.Cause]) -> KubernetesError:
    """422 Invalid with `details.causes`, as apierrors.NewInvalid renders a field.ErrorList."""
    kind, group = _KNOWN[res]
    return KubernetesError(
        status=422, reason="Invalid", message=kube_rules.invalid_message(kind, group, name, causes),
        details={"name": name, "group": group, "kind": kind, "causes": [c.as_status_cause() for c in causes]},
    )  # fmt: skip


def _method(request) -> str:
    return getattr(request.method, "value", str(request.method)).upper()


def _dry_run(request) -> bool:
    """`dryRun=All`: the request is decoded, defaulted, admitted and validated, and answered; nothing is stored."""
    values = [v for k, v in request.url.query.items() if k == "dryRun"]
    for value in values:
        if value != "All":
            raise status_error(400, f'dryRun: Unsupported value: "{value}": supported values: "All"')
    return bool(values)


def _json(body: dict, status: int, warnings: list[str]) -> aiohttp.web.Response:
    response = aiohttp.web.json_response(body, status=status)
    for warning in warnings:
        response.headers.add("Warning", warning)
    return response


def _replace(target: dict, new: dict) -> None:
    """Replace the contents of `target` (kmock stores the request's own dict)."""
    target.clear()
    target.update(new)


# What a client cannot change on update (the registry copies them from the stored object).
_SYSTEM_METADATA = {"name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp", "selfLink"}


def _patch_from(old: dict, new: dict) -> dict:
    """The merge patch that turns `old` into `new` (null for every key `new` lacks)."""
    patch: dict = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            patch[key] = _patch_from(old[key], value)
        elif old.get(key) != value or key not in old:
            patch[key] = copy.deepcopy(value)
    return patch


def _merge(target: dict, patch: dict) -> dict:
    """A JSON merge patch (RFC 7386): null deletes, objects merge, anything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


# --- label selectors ----------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!?)\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[-A-Za-z0-9_.]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def parse_selector(selector: str) -> list[tuple[str, str, set[str]]]:
    """`labelSelector` into (operator, key, values) requirements; ValueError if malformed."""
    requirements = []
    for part in re.split(r",(?![^(]*\))", selector):
        if not part.strip():
            continue
        match = _REQUIREMENT.match(part)
        if not match or (match["neg"] and (match["op"] or match["setop"])):
            raise ValueError(f"unable to parse requirement: {part.strip()!r}")
        if match["neg"]:
            requirements.append(("!", match["key"], set()))
        elif match["op"]:
            requirements.append(("!=" if match["op"] == "!=" else "=", match["key"], {match["value"]}))
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            requirements.append((match["setop"], match["key"], values))
        else:
            requirements.append(("exists", match["key"], set()))
    return requirements


def selector_matches(requirements: list[tuple[str, str, set[str]]], labels: dict[str, str]) -> bool:
    for op, key, values in requirements:
        present, value = key in labels, labels.get(key)
        ok = {
            "exists": present,
            "!": not present,
            "=": present and value in values,
            "in": present and value in values,
            "!=": value not in values,
            "notin": value not in values,
        }[op]
        if not ok:
            return False
    return True


# --- the emulator -------------------------------------------------------------------


@attrs.define(kw_only=True)
class KubeEmulator(KubernetesEmulator):
    tokens: dict[str, str] | None = None  # bearer token -> user; None: no authentication nor authorization
    rbac: "Rbac | None" = None
    # The namespaces that exist: creating anything elsewhere is the NamespaceLifecycle 404.
    namespaces: set[str] = attrs.field(factory=set)
    _faults: list[Fault] = attrs.field(factory=list, init=False)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for res, (kind, _) in _KNOWN.items():
            self.resources[res] = ResourceInfo(
                kind=kind,
                namespaced=True,
                verbs={"create", "get", "list", "watch", "patch", "update", "delete"},
                subresources={"status"},
            )

    # --- what tests call ---------------------------------------------------------

    def fail_next(self, verb: str, plural: str, status: int | None = None, message: str = "injected by the test", *, reason: str | None = None, delay: float = 0.0) -> None:
        """The next `verb` (create/fetch/list/update/delete) on `plural` answers `status` after
        `delay` seconds, changing nothing; without a status it is carried out, then answered late."""
        self._faults.append(Fault(verb, plural, status, message, reason, delay))

    def get(self, res: resource, namespace: str, name: str) -> dict | None:
        """The stored object as a plain dict, or None if it does not exist (or was deleted)."""
        key = (res, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def live(self, res: resource, namespace: str | None = None) -> list[dict]:
        """Every stored object of `res` that is not deleted."""
        return [obj.raw for (r, ns, _), obj in self.objects.items() if r == res and not obj.deleted and namespace in (None, ns)]

    async def set_job_status(self, namespace: str, name: str, **status: Any) -> dict:
        """Write the Job's status as the Job controller would, e.g.
        `conditions=[job_condition("Complete")], succeeded=1`. Returns the updated Job."""
        key = (JOBS, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            raise KeyError(f"no Job {namespace}/{name}")
        obj = self.objects[key]
        obj.patch({"status": status, "metadata": {"resourceVersion": self._next_version()}})
        await self._buses[JOBS].put({"type": "MODIFIED", "object": obj.raw})
        return obj.raw

    async def set_pod_status(self, namespace: str, name: str, *, created: str | None = None, **status: Any) -> dict:
        """Write a Pod's status as the kubelet would (e.g. `containerStatuses=[...]`); `created` sets its
        creationTimestamp (the API server's, one-second resolution) to order pods in a test."""
        key = (PODS, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            raise KeyError(f"no Pod {namespace}/{name}")
        meta: dict[str, Any] = {"resourceVersion": self._next_version()}
        if created:
            meta["creationTimestamp"] = created
        self.objects[key].patch({"status": status, "metadata": meta})
        return self.objects[key].raw

    async def job_reaches_target(self, namespace: str, name: str, terminal: str, *, reason: str | None = None, message: str = "") -> dict:
        """Play the Job controller of Kubernetes 1.31+ at the moment a Job's outcome is decided while its pods
        still terminate: `SuccessCriteriaMet` (for `Complete`) or `FailureTarget` (for `Failed`) is added,
        the terminal condition is not there yet (pkg/controller/job/job_controller.go; KEP-4368 made it GA)."""
        interim = {"Complete": "SuccessCriteriaMet", "Failed": "FailureTarget"}[terminal]
        reason = reason or {"Complete": "CompletionsReached", "Failed": "BackoffLimitExceeded"}[terminal]
        job = self.get(JOBS, namespace, name) or {}
        conditions = [*((job.get("status") or {}).get("conditions") or []), job_condition(interim, reason=reason, message=message)]
        return await self.set_job_status(namespace, name, active=0, terminating=1, conditions=conditions,
                                         startTime=(job.get("status") or {}).get("startTime") or _now())  # fmt: skip

    async def job_pods_gone(self, namespace: str, name: str) -> dict:
        """...and once every pod has terminated, the terminal condition, with the interim one's reason and message
        (and `completionTime` for `Complete`)."""
        job = self.get(JOBS, namespace, name) or {}
        status = job.get("status") or {}
        conditions = status.get("conditions") or []
        interim = next(c for c in reversed(conditions) if c["type"] in ("SuccessCriteriaMet", "FailureTarget"))
        terminal = "Complete" if interim["type"] == "SuccessCriteriaMet" else "Failed"
        extra = {"completionTime": _now(), "succeeded": 1} if terminal == "Complete" else {"failed": max(1, status.get("failed") or 0)}
        conditions = [*conditions, job_condition(terminal, reason=interim["reason"], message=interim.get("message", ""))]
        return await self.set_job_status(namespace, name, terminating=0, conditions=conditions, **extra)

    # --- the server side ---------------------------------------------------------

    def _next_version(self) -> str:
        return str(next(self._versions))

    async def _handle(self, request):
        self._authorize(request)
        res = request.resource
        if res is None or not res.plural or request.subresource not in (None, "status"):
            return await super()._handle(request)
        if request.action is None and not (_method(request) == "PUT" and request.name):
            return await super()._handle(request)

        if request.action is None and _method(request) == "PUT" and request.name:
            return await self._replace_object(request)  # kmock routes no PUT
        fault = await self._take_fault(request)
        answer, warnings, deleted_uid = self._admit(request, _dry_run(request))
        if answer is not None:
            return answer
        response = await super()._handle(request)
        for warning in warnings:
            response.headers.add("Warning", warning)
        if deleted_uid and response.status < 300:
            await self._collect_dependents(deleted_uid, self._propagation(request, res))
        if fault is not None:
            await asyncio.sleep(fault.delay)  # done, but answered late: a client timeout does not undo it
        return response

    async def _replace_object(self, request):
        """PUT: an update that replaces the object (`_prepare_update`), stored here as kmock stores a patch."""
        res = request.resource
        existing = self.get(res, request.namespace, request.name)
        if existing is None:
            raise status_error(404, f'{_qualified(res)} "{request.name}" not found', res=res, name=request.name)
        if not isinstance(request.data, dict):
            raise status_error(400, "the request body must be a JSON object")
        result, warnings = self._prepare_update(request, existing)
        if _dry_run(request):
            return _json(result, 200, warnings)
        async with self._lock:
            result["metadata"]["resourceVersion"] = self._next_version()
            obj = self.objects[(res, request.namespace, request.name)]
            obj.patch(_patch_from(existing, result))
            await self._buses[res].put({"type": "MODIFIED", "object": obj.raw})
        return _json(obj.raw, 200, warnings)

    def _admit(self, request, dry_run: bool) -> tuple[aiohttp.web.Response | None, list[str], str | None]:
        """Before kmock stores anything: (a dry run's answer, the `Warning`s to send, the uid a delete removes)."""
        res = request.resource
        if request.action == action.CREATE:
            warnings = self._prepare_create(request)
            return (_json(request.data, 201, warnings) if dry_run else None), warnings, None
        if request.action in (action.FETCH, action.UPDATE, action.DELETE):
            existing = self.get(res, request.namespace, request.name)
            if existing is None:
                raise status_error(404, f'{_qualified(res)} "{request.name}" not found', res=res, name=request.name)
            if request.action == action.UPDATE and isinstance(request.data, dict):
                result, warnings = self._prepare_update(request, existing)
                if dry_run:
                    return _json(result, 200, warnings), warnings, None
                result["metadata"]["resourceVersion"] = self._next_version()
                _replace(request.data, _patch_from(existing, result))  # kmock merges it into what it stores
                return None, warnings, None
            if request.action == action.DELETE:
                return (_json(existing, 200, []) if dry_run else None), [], existing.get("metadata", {}).get("uid")
        elif request.action.value.lower() == "list" and request.params.get("labelSelector"):
            try:
                parse_selector(request.params["labelSelector"])
            except ValueError as exc:
                raise status_error(400, f"unable to parse labelSelector: {exc}") from None
        return None, [], None

    def _authorize(self, request) -> None:
        """401 without a known token; 403 for a verb the user's bindings do not grant (as the API server words it)."""
        if self.tokens is None:
            return
        header = request.headers.get("Authorization") or request.headers.get("authorization") or ""
        user = self.tokens.get(header[len("Bearer "):]) if header.startswith("Bearer ") else None
        if user is None:
            raise status_error(401, "Unauthorized")
        res = request.resource
        if res is None or not res.plural or user in ADMINS:
            return  # non-resource URLs (discovery): allowed to everyone authenticated, as system:discovery does
        verb = request_verb(getattr(request.method, "value", str(request.method)).upper(), request.name, request.params)
        resource = f"{res.plural}/{request.subresource}" if request.subresource else str(res.plural)
        rbac = self.rbac or Rbac([], [])
        if not rbac.allows(user, verb, res.group or "", resource, request.namespace, request.name):
            raise forbidden(user, verb, res.group or "", resource, request.namespace, request.name)
        if verb == "create" and isinstance(request.data, dict):
            # OwnerReferencesPermissionEnforcement (admission): blockOwnerDeletion needs update on the owner's finalizers.
            for ref in (request.data.get("metadata") or {}).get("ownerReferences") or []:
                if not ref.get("blockOwnerDeletion"):
                    continue
                group = ref.get("apiVersion", "v1").rpartition("/")[0]
                plural = OWNER_PLURALS.get(ref.get("kind"), f"{str(ref.get('kind', '')).lower()}s")
                if not rbac.allows(user, "update", group, f"{plural}/finalizers", request.namespace, ref.get("name")):
                    denied = forbidden(user, "update", group, f"{plural}/finalizers", request.namespace, None).message
                    name = (request.data.get("metadata") or {}).get("name")
                    raise status_error(
                        403,
                        f'{_qualified(res)} "{name}" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a '
                        f"resource you can't set finalizers on: {denied.split(': ', 1)[1]}, {ref}",
                        res=res, name=name,
                    )

    async def _take_fault(self, request) -> Fault | None:
        """The fault for this request, if any: an error status is raised here (after its delay)."""
        for fault in self._faults:
            if fault.verb == request.action.value.lower() and fault.plural == request.resource.plural:
                self._faults.remove(fault)
                if fault.status is not None:
                    await asyncio.sleep(fault.delay)
                    raise status_error(fault.status, fault.message, reason=fault.reason)
                return fault
        return None

    def _prepare_create(self, request) -> list[str]:
        """The create's body as the API server would store it, in its order: decoding (unknown fields),
        defaulting, the namespace's existence (admission), validation (422), then AlreadyExists.
        Returns the `Warning` headers to answer with."""
        res, body = request.resource, request.data
        if not isinstance(body, dict):
            raise status_error(400, "the request body must be a JSON object")
        kind = _KNOWN[res][0]
        warnings = self._decode(request, kind)
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise status_error(422, f"{_qualified(res)} is invalid: metadata.name: Required value", reason="Invalid", res=res)
        if request.namespace and meta.get("namespace") not in (None, request.namespace):
            raise status_error(400, "the namespace of the provided object does not match the namespace sent on the request")
        namespace = request.namespace or meta.get("namespace")
        meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        body.pop("status", None)  # a create never sets the status
        _replace(body, kube_rules.defaulted(body, kind))
        if namespace not in self.namespaces:
            raise status_error(404, f'namespaces "{namespace}" not found', res=resource("", "v1", "namespaces"), name=namespace)
        causes = kube_rules.invalid(body, kind)
        if causes:
            raise invalid_error(res, name, causes)
        if self.get(res, namespace, name) is not None:
            raise status_error(409, f'{_qualified(res)} "{name}" already exists', reason="AlreadyExists", res=res, name=name)
        body["metadata"]["resourceVersion"] = self._next_version()
        return warnings

    def _prepare_update(self, request, existing: dict) -> tuple[dict, list[str]]:
        """(the object an update or patch leaves, the `Warning`s): unknown fields as on create; a stale
        `metadata.resourceVersion` is a 409 Conflict (optimistic concurrency: compared with the stored one when
        the body carries one); a PUT replaces the object, but not its status (nor, on /status, anything else)
        and not the system's metadata; a patch is a JSON merge patch; the result is validated (422)."""
        res = request.resource
        kind = _KNOWN[res][0]
        warnings = self._decode(request, kind)
        sent = (request.data.get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != existing["metadata"]["resourceVersion"]:
            raise status_error(
                409,
                f'Operation cannot be fulfilled on {_qualified(res)} "{request.name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                reason="Conflict", res=res, name=request.name,
            )  # fmt: skip
        if _method(request) != "PUT":
            result = _merge(copy.deepcopy(existing), request.data)
        elif request.subresource == "status":
            result = {**copy.deepcopy(existing), "status": copy.deepcopy(request.data.get("status"))}
        else:
            result = copy.deepcopy(request.data)
            if "status" in existing:
                result["status"] = copy.deepcopy(existing["status"])
            meta = result.setdefault("metadata", {})
            meta.update({k: v for k, v in existing["metadata"].items() if k in _SYSTEM_METADATA})
            result = kube_rules.defaulted(result, kind)
        result.setdefault("metadata", {})["resourceVersion"] = existing["metadata"]["resourceVersion"]
        causes = kube_rules.invalid(result, kind)
        if causes:
            raise invalid_error(res, request.name, causes)
        return result, warnings

    @staticmethod
    def _decode(request, kind: str) -> list[str]:
        """`fieldValidation`: Strict refuses unknown fields (400), Warn (the default) answers a `Warning` for
        each, Ignore says nothing; none of them is stored."""
        directive = request.params.get("fieldValidation") or "Warn"
        if directive not in ("Strict", "Warn", "Ignore"):
            raise status_error(400, f"fieldValidation: Unsupported value: {directive!r}: supported values: \"Ignore\", \"Strict\", \"Warn\"")
        pruned, unknown = kube_rules.prune(request.data, kind)
        if unknown and directive == "Strict":
            version = request.resource.version
            raise status_error(400, kube_rules.strict_decoding_message(kind, version, unknown))
        _replace(request.data, pruned)
        return [kube_rules.warning_header(path) for path in unknown] if directive == "Warn" else []

    @staticmethod
    def _propagation(request, res: resource) -> str:
        body = request.data if isinstance(request.data, dict) else {}
        policy = request.params.get("propagationPolicy") or body.get("propagationPolicy")
        if not policy and (request.params.get("orphanDependents") == "true" or body.get("orphanDependents") is True):
            policy = "Orphan"
        return policy or ("Orphan" if res in _DEFAULT_ORPHANS else "Background")

    async def _collect_dependents(self, owner_uid: str, policy: str) -> None:
        """The garbage collector: delete (or orphan) what `owner_uid` owned, then what they owned."""
        pending = [owner_uid]
        while pending:
            uid = pending.pop()
            async with self._lock:
                for (res, _, _), obj in list(self.objects.items()):
                    if obj.deleted:
                        continue
                    refs = obj.get("metadata", {}).get("ownerReferences") or []
                    if not any(ref.get("uid") == uid for ref in refs):
                        continue
                    if policy == "Orphan":
                        kept = [ref for ref in refs if ref.get("uid") != uid]
                        obj.patch({"metadata": {"ownerReferences": kept or None, "resourceVersion": self._next_version()}})
                        await self._buses[res].put({"type": "MODIFIED", "object": obj.raw})
                        continue
                    raw = obj.raw
                    obj.delete()
                    await self._buses[res].put({"type": "DELETED", "object": raw})
                    pending.append(raw["metadata"].get("uid"))

    async def _serve_list(self, request):
        answer = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            requirements = parse_selector(selector)
            answer["items"] = [
                item for item in answer["items"] if selector_matches(requirements, item.get("metadata", {}).get("labels") or {})
            ]
        kind = _KNOWN.get(request.resource, (str(request.resource.plural).capitalize(), ""))[0]
        version = f"{request.resource.group}/{request.resource.version}" if request.resource.group else request.resource.version
        answer.update(apiVersion=version, kind=f"{kind}List", metadata={"resourceVersion": str(next(self._versions))})
        return answer


# --- authorization ---------------------------------------------------------------------

ADMINS = {"kubernetes-admin"}  # in group system:masters: every verb, as on a real cluster
OWNER_PLURALS = {"Job": "jobs", "Pod": "pods", "PersistentVolumeClaim": "persistentvolumeclaims", "Secret": "secrets"}


def request_verb(method: str, name: str | None, params: dict) -> str:
    """The authorization verb of an HTTP request, as the API server's RequestInfoFactory derives it."""
    if method == "GET" and str(params.get("watch", "")).lower() in ("true", "1"):
        return "watch"
    one = name is not None
    return {
        "GET": "get" if one else "list",
        "HEAD": "get" if one else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if one else "deletecollection",
    }.get(method, method.lower())


def forbidden(user: str, verb: str, group: str, resource: str, namespace: str | None, name: str | None) -> KubernetesError:
    """The API server's 403 for an RBAC refusal (k8s.io/apiserver endpoints/handlers/responsewriters.ForbiddenStatusError)."""
    plural, _, sub = resource.partition("/")
    qualified = f"{plural}.{group}" if group else plural
    subject = f'{qualified} "{name}"' if name else qualified
    reason = f'User "{user}" cannot {verb} resource "{resource}" in API group "{group}"'
    reason += f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    details: dict[str, Any] = {"group": group, "kind": plural}
    if name:
        details["name"] = name
    return KubernetesError(status=403, reason="Forbidden", message=f"{subject} is forbidden: {reason}", details=details)


@dataclass(frozen=True)
class Rule:
    api_groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    resource_names: frozenset[str]

    def allows(self, verb: str, group: str, resource: str, name: str | None) -> bool:
        return (
            (verb in self.verbs or "*" in self.verbs)
            and (group in self.api_groups or "*" in self.api_groups)
            and (resource in self.resources or "*" in self.resources
                 or ("/" in resource and f"*/{resource.split('/', 1)[1]}" in self.resources))
            and (not self.resource_names or name in self.resource_names)
        )  # fmt: skip


@dataclass
class Rbac:
    """Roles and bindings as the RBAC authorizer reads them: a user may do what a rule of a role bound to it allows
    (a Role's rules in its namespace, a ClusterRole's everywhere through a ClusterRoleBinding)."""

    roles: list[tuple[str, str | None, str, list[Rule]]]  # (kind, namespace, name, rules)
    bindings: list[tuple[str | None, str, str, set[str]]]  # (namespace or None if cluster-wide, role kind, role name, users)

    @classmethod
    def from_objects(cls, objects: list[dict]) -> "Rbac":
        roles, bindings = [], []
        for obj in objects:
            if not isinstance(obj, dict) or obj.get("apiVersion") != "rbac.authorization.k8s.io/v1":
                continue
            meta = obj.get("metadata") or {}
            if obj["kind"] in ("Role", "ClusterRole"):
                rules = [
                    Rule(frozenset(r.get("apiGroups") or []), frozenset(r.get("resources") or []),
                         frozenset(r.get("verbs") or []), frozenset(r.get("resourceNames") or []))
                    for r in obj.get("rules") or []
                ]  # fmt: skip
                roles.append((obj["kind"], meta.get("namespace") if obj["kind"] == "Role" else None, meta["name"], rules))
            elif obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                users = set()
                for subject in obj.get("subjects") or []:
                    if subject.get("kind") == "ServiceAccount":
                        users.add(f"system:serviceaccount:{subject.get('namespace') or meta.get('namespace')}:{subject['name']}")
                    elif subject.get("kind") == "User":
                        users.add(subject["name"])
                ref = obj["roleRef"]
                namespace = meta.get("namespace") if obj["kind"] == "RoleBinding" else None
                bindings.append((namespace, ref["kind"], ref["name"], users))
        return cls(roles, bindings)

    @classmethod
    def from_yaml(cls, text: str) -> "Rbac":
        import yaml

        return cls.from_objects(list(yaml.safe_load_all(text)))

    def allows(self, user: str, verb: str, group: str, resource: str, namespace: str | None, name: str | None) -> bool:
        for binding_ns, role_kind, role_name, users in self.bindings:
            if user not in users or (binding_ns is not None and binding_ns != namespace):
                continue
            for kind, role_ns, name_, rules in self.roles:
                if kind != role_kind or name_ != role_name:
                    continue
                if kind == "Role" and role_ns != binding_ns:
                    continue  # a RoleBinding names a Role of its own namespace
                if any(rule.allows(verb, group, resource, name) for rule in rules):
                    return True
        return False


def job_condition(type_: str, status: str = "True", reason: str | None = None, message: str = "") -> dict:
    """A Job condition as the Job controller writes it."""
    default_reasons = {"Complete": "CompletionsReached", "Failed": "BackoffLimitExceeded", "Suspended": "JobSuspended"}
    now = _now()
    return {
        "type": type_,
        "status": status,
        "reason": reason or default_reasons.get(type_, type_),
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }
