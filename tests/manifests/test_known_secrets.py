"""The cluster's stream knows the values of the Secrets it must never show (issue 9, finding 6).

knative/stream.yaml projects the secret keys of the model and object-store
Secrets into one directory and points DOCKYARD_KNOWN_SECRETS_FILE at it; the
stream's `Redaction` reads every file there, Kubernetes' `..data` layout
included, and reads it again when the Secret changes.
"""

from __future__ import annotations

import os

import yaml

from agent.redact import REPLACEMENT
from functions.core.settings import Settings
from functions.stream import redaction as stream_redaction
from functions.stream.redaction import Redaction
from tests.manifests import KNATIVE_DIR, documents, knative_services, pod_template

STREAM = knative_services(documents(KNATIVE_DIR))["stream"]
SECRETS = [d for d in yaml.safe_load_all((KNATIVE_DIR / "secrets.example.yaml").read_text()) if d]
SECRET_KEYS = {"api_key", "access_key_id", "secret_access_key"}  # the keys that hold secrets (not addresses)


def _spec() -> tuple[dict, dict]:
    spec = pod_template(STREAM.body)["spec"]
    (container,) = spec["containers"]
    return spec, container


def _known_secrets_volume() -> tuple[str, dict]:
    """(mount path, volume) of the directory DOCKYARD_KNOWN_SECRETS_FILE names."""
    spec, container = _spec()
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    path = env.get("DOCKYARD_KNOWN_SECRETS_FILE")
    assert path, "knative/stream.yaml: the stream has no known-secrets file"
    mounts = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == path]
    assert len(mounts) == 1, f"nothing is mounted at {path}"
    assert mounts[0].get("readOnly") is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
    return path, volume


def _projected() -> dict[tuple[str, str], str]:
    """(Secret name, key) -> file name in the known-secrets directory."""
    _, volume = _known_secrets_volume()
    assert "projected" in volume, "one directory for all the Secrets: a projected volume"
    files = {}
    for source in volume["projected"]["sources"]:
        secret = source["secret"]
        assert secret.get("optional") is True, f"{secret['name']}: a missing Secret must not keep the stream down"
        for item in secret["items"]:
            files[(secret["name"], item["key"])] = item["path"]
    return files


def test_the_stream_mounts_every_secret_value_of_the_model_and_object_store():
    files = _projected()
    assert set(files) == {
        ("dockyard-model", "api_key"),
        ("dockyard-object-store", "access_key_id"),
        ("dockyard-object-store", "secret_access_key"),
    }
    assert len(set(files.values())) == len(files), "two keys in one file"
    assert all("/" not in name and not name.startswith(".") for name in files.values())


def test_every_secret_key_of_the_templates_in_the_stream_namespace_is_known_to_the_stream():
    files = _projected()
    for secret in SECRETS:
        name, namespace = secret["metadata"]["name"], secret["metadata"]["namespace"]
        for key in set(secret["stringData"]) & SECRET_KEYS:
            if namespace == STREAM.namespace:
                assert (name, key) in files, f"{namespace}/{name}.{key} is not redacted by the stream"
    templates = {(s["metadata"]["namespace"], s["metadata"]["name"]): set(s["stringData"]) for s in SECRETS}
    for name, key in files:
        assert key in templates[(STREAM.namespace, name)], f"no template holds {STREAM.namespace}/{name}.{key}"


def test_the_path_is_a_setting_the_stream_reads():
    path, _ = _known_secrets_volume()
    assert Settings.from_env({"DOCKYARD_KNOWN_SECRETS_FILE": path}).known_secrets_file == path


def _write_secret_volume(root, files: dict[str, str], generation: str) -> None:
    """The layout the kubelet writes: <root>/..<timestamp>/<file>, <root>/..data -> it, <root>/<file> -> ..data/<file>."""
    data_dir = root / f"..{generation}"
    data_dir.mkdir()
    for name, value in files.items():
        (data_dir / name).write_text(value)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


def test_the_stream_redacts_what_the_volume_holds_and_follows_a_rotation(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_redaction, "SECRETS_CHECK_SECONDS", 0.0)
    names = sorted(_projected().values())
    old = {name: f"old-value-{i}-Zq8vXk2pLm" for i, name in enumerate(names)}
    _write_secret_volume(tmp_path, old, "2026_12_01_10_00_00.1")
    redaction = Redaction(tmp_path)
    text = " ".join(old.values())
    assert redaction.current().redact(text) == " ".join([REPLACEMENT] * len(old))
    assert redaction.current().redact("endpoint http://minio:9000") == "endpoint http://minio:9000"

    new = {name: f"new-value-{i}-Wr4tYu7iOp" for i, name in enumerate(names)}
    _write_secret_volume(tmp_path, new, "2026_12_01_11_00_00.2")
    for name in old:
        (tmp_path / "..2026_12_01_10_00_00.1" / name).unlink()
    (tmp_path / "..2026_12_01_10_00_00.1").rmdir()
    assert redaction.current().redact(" ".join(new.values())) == " ".join([REPLACEMENT] * len(new))


def test_a_missing_directory_means_formats_only(tmp_path):
    redaction = Redaction(tmp_path / "absent")
    assert redaction.current().known_count == 0
    assert redaction.current().redact("AKIAIOSFODNN7EXAMPLE") == REPLACEMENT
