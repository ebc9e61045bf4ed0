"""Every manifest is well-formed for every Kubernetes version dockyard supports.

Built-in kinds go through kubernetes-validate in strict mode (no unknown fields)
against each Kubernetes version from the pinned minimum (`versions.KUBERNETES_MIN`) to the newest the package knows. Custom
resources have no schema there: the Knative kinds are validated strictly against their
vendored upstream CRDs in test_crd_schemas.py; the Kustomization's required field is
checked by hand below. The Jobs and PVCs of functions.core.factory
are validated the same way.
"""

from __future__ import annotations

import pytest
from kubernetes_validate import utils as kv
from packaging.version import Version

from tests.manifests.versions import KUBERNETES_MIN
from tests.manifests import ROOT, KNATIVE_DIR, MANIFEST_DIRS, Doc, documents, rendered_manifests
from tests.manifests.crd_schema import load_crds

OLDEST = Version(KUBERNETES_MIN)  # the pinned minimum (Knative 1.20 needs 1.32)
VERSIONS = [v for v in sorted(set(kv.all_versions()), key=Version) if Version(v) >= OLDEST]

DOCS = documents()


def _get(body: dict, path: str):
    value = body
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# Custom kinds with no vendored CRD: (apiVersion, kind) -> required dotted paths. The Knative kinds
# are validated strictly against their upstream CRDs in test_crd_schemas.py (CRDS below).
CUSTOM_KINDS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): ("resources",),  # test_kustomization_lists_every_manifest checks them
}
CRDS = load_crds()


def _custom(doc: Doc) -> bool:
    """Not a kind the API server ships: a Knative or Kustomize resource, or a group that is not *.k8s.io."""
    group = doc.api_version.rpartition("/")[0]
    key = (doc.api_version, doc.kind)
    return key in CUSTOM_KINDS or key in CRDS or ("." in group and not group.endswith(".k8s.io"))


BUILTIN = [d for d in DOCS if not _custom(d)]
CUSTOM = [d for d in DOCS if _custom(d) and (d.api_version, d.kind) not in CRDS]


def test_the_version_range_is_not_empty():
    assert VERSIONS and VERSIONS[0].startswith(KUBERNETES_MIN + "."), VERSIONS
    assert BUILTIN and CUSTOM


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", BUILTIN, ids=lambda d: d.id)
def test_builtin_manifest_is_valid(doc: Doc, version: str):
    try:
        kv.validate(doc.body, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc.id} is invalid for Kubernetes {version} at {path or '(top)'}: {exc.message}")
    except kv.SchemaNotFoundError as exc:
        pytest.fail(f"{doc.id}: {exc.message} (a custom resource? vendor its CRD in tests/manifests/schemas/)")


@pytest.mark.parametrize("doc", CUSTOM, ids=lambda d: d.id)
def test_custom_resource_has_its_required_fields(doc: Doc):
    key = (doc.api_version, doc.kind)
    assert key in CUSTOM_KINDS, f"{doc.id}: unknown kind {key}; add it to CUSTOM_KINDS with its required fields"
    missing = [path for path in CUSTOM_KINDS[key] if _get(doc.body, path) in (None, "", [], {})]
    assert not missing, f"{doc.id} lacks {', '.join(missing)}"


def test_every_namespaced_manifest_names_its_namespace():
    """kubectl apply -k applies to two namespaces: no document may depend on the current one."""
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "Kustomization"}
    unnamed = [d.id for d in DOCS if d.kind not in cluster_scoped and not d.namespace]
    assert not unnamed, f"set metadata.namespace in {unnamed}"


@pytest.mark.parametrize("directory", MANIFEST_DIRS, ids=lambda p: p.name)
def test_kustomization_lists_every_manifest(directory):
    """Every manifest file is applied by `kubectl apply -k`, except the Secret templates."""
    import yaml

    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    missing = sorted(listed - {p.name for p in directory.glob("*.yaml")})
    assert not missing, f"{directory.name}/kustomization.yaml lists files that do not exist: {missing}"
    expected = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == expected, f"{directory.name}/kustomization.yaml: unlisted {sorted(expected - listed)}"


def test_secret_templates_hold_no_values():
    import yaml

    path = KNATIVE_DIR / "secrets.example.yaml"
    secrets = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in secrets} == {
        ("dockyard-agents", "dockyard-object-store"),
        ("dockyard", "dockyard-object-store"),
        ("dockyard-agents", "dockyard-model"),
        ("dockyard", "dockyard-api-tokens"),
        ("dockyard", "dockyard-model"),  # for the stream's known-secrets volume
        ("dockyard", "dockyard-nats"),  # the services' NATS users and the launcher's signing key
        ("knative-eventing", "dockyard-eventing-nats"),  # eventing-natss's NATS user
        ("dockyard-agents", "dockyard-git-push"),  # repo.push: the snapshotter's git credentials (optional)
    }
    for secret in secrets:
        assert "data" not in secret, f"{path.relative_to(ROOT)}: use stringData placeholders, not data"
        for key, value in secret["stringData"].items():
            if key in ("access_key_id", "secret_access_key", "api_key", "password", "token") or key.endswith((".creds", ".nk", ".pub")):
                assert value == "REPLACE_ME", f"{secret['metadata']['name']}.{key} must stay a placeholder"


RENDERED = [
    pytest.param(manifest, id=f"{name}:{manifest['kind']}")
    for name, manifests in rendered_manifests().items()
    for manifest in manifests
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("manifest", RENDERED)
def test_rendered_job_and_pvc_are_valid(manifest: dict, version: str):
    try:
        kv.validate(manifest, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"rendered {manifest['kind']} is invalid for Kubernetes {version} at {path}: {exc.message}")
