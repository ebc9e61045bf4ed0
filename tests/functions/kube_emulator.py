"""A Kubernetes API server for tests: kmock's `KubernetesEmulator`, made to answer like a real one.

kmock stores objects in memory and serves them over real HTTP (aiohttp, in the
test's event loop), so the official `kubernetes` client talks to it unchanged.
What a real API server does and plain kmock does not, added here:

- create assigns `metadata.uid`, `resourceVersion`, `creationTimestamp`,
  `generation` and the namespace from the URL; every change bumps `resourceVersion`;
- answers are proper `Status` bodies: 409 `AlreadyExists` on a duplicate create,
  404 `NotFound` for a missing object, 400 `BadRequest` for a bad label selector
  or a namespace that contradicts the URL;
- deleting an object deletes its dependents (objects whose `ownerReferences`
  name its UID), recursively. `propagationPolicy: Orphan` keeps them and strips
  the reference; a Job deleted without a policy orphans, as batch/v1 does;
- lists honour `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`);
- `set_job_status()` plays the Job controller, `set_pod_status()` the kubelet; `fail_next()` injects an error
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
import itertools
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import attrs
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, action, resource

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
    409: "AlreadyExists",
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
        details = {"group": _KNOWN.get(res, (None, res.group))[1], "kind": res.plural}
        if name:
            details["name"] = name
    return KubernetesError(status=status, reason=reason or _STATUS_REASONS.get(status, "Unknown"), message=message, details=details)


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

    # --- the server side ---------------------------------------------------------

    def _next_version(self) -> str:
        return str(next(self._versions))

    async def _handle(self, request):
        self._authorize(request)
        res = request.resource
        if res is None or not res.plural or request.action is None or request.subresource not in (None, "status"):
            return await super()._handle(request)

        fault = await self._take_fault(request)
        verb = request.action.value.lower()
        deleted_uid = None
        if request.action == action.CREATE:
            self._prepare_create(request)
        elif request.action in (action.FETCH, action.UPDATE, action.DELETE):
            existing = self.get(res, request.namespace, request.name)
            if existing is None:
                raise status_error(404, f'{_qualified(res)} "{request.name}" not found', res=res, name=request.name)
            if request.action == action.UPDATE and isinstance(request.data, dict):
                request.data.setdefault("metadata", {})["resourceVersion"] = self._next_version()
            if request.action == action.DELETE:
                deleted_uid = existing.get("metadata", {}).get("uid")
        elif verb == "list" and request.params.get("labelSelector"):
            try:
                parse_selector(request.params["labelSelector"])
            except ValueError as exc:
                raise status_error(400, f"unable to parse labelSelector: {exc}") from None

        response = await super()._handle(request)
        if deleted_uid and response.status < 300:
            await self._collect_dependents(deleted_uid, self._propagation(request, res))
        if fault is not None:
            await asyncio.sleep(fault.delay)  # done, but answered late: a client timeout does not undo it
        return response

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

    def _prepare_create(self, request) -> None:
        res, body = request.resource, request.data
        if not isinstance(body, dict):
            raise status_error(400, "the request body must be a JSON object")
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise status_error(422, f"{_qualified(res)} is invalid: metadata.name: Required value", reason="Invalid", res=res)
        if request.namespace and meta.get("namespace") not in (None, request.namespace):
            raise status_error(400, "the namespace of the provided object does not match the namespace sent on the request")
        if self.get(res, request.namespace or meta.get("namespace"), name) is not None:
            raise status_error(409, f'{_qualified(res)} "{name}" already exists', res=res, name=name)
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_version(), creationTimestamp=_now(), generation=1)
        body.pop("status", None)  # a create never sets the status

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
