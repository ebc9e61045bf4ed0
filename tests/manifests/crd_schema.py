"""Strict validation of custom objects against the upstream CRDs vendored in tests/manifests/schemas/.

Two checks, both failures:

1. jsonschema (Draft 4, the dialect OpenAPI v3 schemas of CRDs follow) against the CRD version's
   `openAPIV3Schema`: wrong types, missing required fields, enums, patterns.
2. `pruned_fields`: what the API server would silently drop from a structural schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# The fields of ObjectMeta (k8s.io/apimachinery/pkg/apis/meta/v1/types.go). The API server
# validates an object's root `metadata` as ObjectMeta whatever its CRD schema says there.
OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
        "ownerReferences", "finalizers", "managedFields",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Crd:
    """One served version of a vendored CustomResourceDefinition."""

    file: str
    group: str
    kind: str
    version: str
    schema: dict

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def load_crds(directory: Path = SCHEMA_DIR) -> dict[tuple[str, str], Crd]:
    """(apiVersion, kind) -> Crd for every served version of every CRD file in `directory`."""
    crds = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served"):
                    crd = Crd(path.name, spec["group"], spec["names"]["kind"], version["name"], version["schema"]["openAPIV3Schema"])
                    crds[(crd.api_version, crd.kind)] = crd
    return crds


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top)"


def schema_errors(body: dict, crd: Crd) -> list[str]:
    """jsonschema's findings: types, required fields, enums, formats it knows."""
    validator = jsonschema.Draft4Validator(crd.schema)
    return [f"{_path(e.absolute_path)}: {e.message}" for e in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))]


def pruned_fields(value, schema: dict, path: tuple = (), *, root: bool = True) -> list[str]:
    """The paths of `value` that the API server would prune under the structural `schema`.

    Written by hand because jsonschema cannot say it: a structural schema keeps a field only
    if the object's `properties` list it, or `additionalProperties` gives its values a schema,
    or the object carries `x-kubernetes-preserve-unknown-fields: true` (then the unknown field's
    whole subtree is kept; the mark is not inherited by the declared `properties`, which are
    pruned by their own schemas). JSON Schema's default is the opposite (unknown
    fields are allowed), and `additionalProperties: false` would also reject the fields that
    `x-kubernetes-preserve-unknown-fields` keeps, so neither expresses the rule. Pruning is
    what `kubectl apply` does silently (or `--validate=strict` refuses), so a pruned field in
    a manifest is configuration that never reaches the cluster.

    Special cases, as in k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning:
    `apiVersion`, `kind` and `metadata` are kept at the root and in an
    `x-kubernetes-embedded-resource`; the root `metadata` is ObjectMeta, whatever the schema.
    """
    found: list[str] = []
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                found += pruned_fields(item, items, (*path, i), root=False)
        return found
    if not isinstance(value, dict):
        return found
    properties = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    embedded = root or schema.get("x-kubernetes-embedded-resource") is True
    for key, child in value.items():
        here = (*path, key)
        if root and key == "metadata":
            found += [_path((*here, k)) for k in child if k not in OBJECT_META_FIELDS] if isinstance(child, dict) else []
        elif key in properties:
            found += pruned_fields(child, properties[key], here, root=False)
        elif embedded and key in ("apiVersion", "kind", "metadata"):
            continue
        elif isinstance(additional, dict):
            found += pruned_fields(child, additional, here, root=False)
        elif not preserve and additional is not True:
            found.append(_path(here))
    return found


def problems(body: dict, crds: dict[tuple[str, str], Crd]) -> list[str]:
    """Everything strict validation finds in one custom object; an unknown kind is a problem too."""
    key = (body.get("apiVersion", ""), body.get("kind", ""))
    crd = crds.get(key)
    if crd is None:
        return [f"no vendored CRD for {key[0]} {key[1]} (add it to tests/manifests/schemas/)"]
    found = schema_errors(body, crd)
    found += [f"{p}: unknown field (the structural schema prunes it)" for p in pruned_fields(body, crd.schema)]
    meta = body.get("metadata") or {}
    if not (meta.get("name") or meta.get("generateName")):
        found.append("metadata.name: required")
    return found
