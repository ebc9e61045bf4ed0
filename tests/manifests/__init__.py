"""What the manifest tests share: the YAML documents of knative/ and eventing/, and
the agent Jobs the factory renders with the cluster's own settings ConfigMap."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KNATIVE_DIR = ROOT / "knative"
EVENTING_DIR = ROOT / "eventing"
MANIFEST_DIRS = (KNATIVE_DIR, EVENTING_DIR)
EXAMPLE_TASK = ROOT / "agent" / "examples" / "example_task.json"
JOB_UID = "6f1c2a7e-3b1d-4c55-9a0e-2f4d8b9c1e07"


@dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    path: Path
    index: int
    body: dict

    @property
    def kind(self) -> str:
        return self.body.get("kind", "")

    @property
    def api_version(self) -> str:
        return self.body.get("apiVersion", "")

    @property
    def name(self) -> str:
        return (self.body.get("metadata") or {}).get("name", "")

    @property
    def namespace(self) -> str | None:
        return (self.body.get("metadata") or {}).get("namespace")

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index}:{self.kind}/{self.name}"


def documents(*dirs: Path) -> list[Doc]:
    """Every non-empty YAML document in the *.yaml files of `dirs` (default: knative/ and eventing/)."""
    docs = []
    for directory in dirs or MANIFEST_DIRS:
        for path in sorted(directory.glob("*.yaml")):
            for index, body in enumerate(yaml.safe_load_all(path.read_text())):
                if body is not None:
                    docs.append(Doc(path, index, body))
    return docs


def find(docs: list[Doc], kind: str, api_group: str | None = None, name: str | None = None) -> list[Doc]:
    """The documents of a kind; `api_group` "" means the core group, None any group."""

    def group(doc: Doc) -> str:
        return doc.api_version.rpartition("/")[0]

    return [
        d
        for d in docs
        if d.kind == kind and (api_group is None or group(d) == api_group) and (name is None or d.name == name)
    ]


def one(docs: list[Doc], kind: str, api_group: str | None = None, name: str | None = None) -> Doc:
    found = find(docs, kind, api_group, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} ({api_group}), found {[d.id for d in found]}"
    return found[0]


def knative_services(docs: list[Doc]) -> dict[str, Doc]:
    return {d.name: d for d in find(docs, "Service", "serving.knative.dev")}


def pod_template(body: dict) -> dict:
    """{metadata, spec} of the pod a workload manifest describes (Job, Deployment, Knative Service, Pod)."""
    if body.get("kind") == "Pod":
        return {"metadata": body.get("metadata") or {}, "spec": body["spec"]}
    template = body["spec"]["template"]
    return {"metadata": template.get("metadata") or {}, "spec": template["spec"]}


def settings_env() -> dict[str, str]:
    """The DOCKYARD_* variables of the cluster's settings ConfigMap."""
    configmap = one(documents(KNATIVE_DIR), "ConfigMap", "", "dockyard-settings")
    return {key: str(value) for key, value in configmap.body["data"].items()}


# Stands in for the account public key task-submitted reads from the Secret dockyard-nats.
EXAMPLE_NATS_ACCOUNT = "A" + "D" * 55


def service_env(service: str) -> dict[str, str]:
    """The DOCKYARD_* environment of the Knative Service `service` in the cluster: the settings
    ConfigMap (envFrom), then its own `env` (which wins, as in Kubernetes). An `env` read from a
    Secret (valueFrom) gets a stand-in value: the account key is EXAMPLE_NATS_ACCOUNT."""
    env = settings_env()
    (doc,) = [d for d in documents(KNATIVE_DIR) if d.kind == "Service" and d.api_version.startswith("serving.knative.dev/") and d.name == service]
    (container,) = pod_template(doc.body)["spec"]["containers"]
    for item in container.get("env") or []:
        if item["name"].startswith("DOCKYARD_"):
            env[item["name"]] = item["value"] if "value" in item else EXAMPLE_NATS_ACCOUNT
    return env


def example_tasks() -> dict[str, tuple[object, object]]:
    """name -> (Task, Settings): the bundled example task, and one with every limit, a repo,
    a model and a Kueue queue. Settings come from knative/settings.yaml; those of `launcher`
    from the launching Service's whole environment (knative/functions.yaml, task-submitted),
    NATS credentials included."""
    from functions.core.settings import Settings
    from functions.core.task import parse_task

    settings = Settings.from_env(settings_env())
    example = parse_task(json.loads(EXAMPLE_TASK.read_text()), source="tests/manifests", event_id="example")
    everything = parse_task(
        {
            "task_id": "all-limits",
            "prompt": "Fix the failing test and open nothing else.",
            "repo": {"url": "https://github.com/example/project.git", "ref": "main"},
            "model": "openai:gpt-4o",
            "limits": {"deadline_seconds": 7200, "retries": 5, "storage": "20Gi"},
        },
        source="tests/manifests",
        event_id="all-limits",
    )
    pushing = parse_task({**everything.to_dict(), "repo": {**everything.repo, "push": {"branch": "fix/tests"}}},
                         source="tests/manifests", event_id="pushing")  # repo.push: the snapshotter's git Secret
    return {
        "example": (example, settings),
        "all-limits-kueue": (everything, settings.updated({"kueue_queue": "dockyard", "default_model": "openai:gpt-4o"})),
        "launcher": (everything, Settings.from_env(service_env("task-submitted"))),
        "launcher-push": (pushing, Settings.from_env(service_env("task-submitted"))),
    }


def rendered_manifests() -> dict[str, list[dict]]:
    """name -> [Job, (Secret,) PVC] as functions.core.factory renders them for each of `example_tasks()`
    (the Secret of NATS credentials when the settings mint them; placeholder values)."""
    from functions.core.factory import render

    return {name: render(task, settings, job_uid=JOB_UID) for name, (task, settings) in example_tasks().items()}


def rendered_jobs() -> dict[str, dict]:
    """name -> the Job of `rendered_manifests()`."""
    return {name: manifests[0] for name, manifests in rendered_manifests().items()}
