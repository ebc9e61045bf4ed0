"""The cluster's stream can serve downloads: it reads the object store the settings name, with the
credentials of the Secret dockyard-object-store mounted where agent/storage.py looks for them."""

from __future__ import annotations

from pathlib import PurePosixPath

import yaml

from agent import contract
from agent.storage import S3Store, open_store
from tests.manifests import KNATIVE_DIR, documents, knative_services, pod_template

STREAM = knative_services(documents(KNATIVE_DIR))["stream"]
DOCS = [d for d in yaml.safe_load_all((KNATIVE_DIR / "settings.yaml").read_text()) if d]


def _container() -> tuple[dict, dict]:
    spec = pod_template(STREAM.body)["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_the_stream_mounts_the_object_store_secret_where_the_store_reads_it():
    spec, container = _container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in container["volumeMounts"] if volumes[m["name"]].get("secret", {}).get("secretName") == "dockyard-object-store"]
    assert len(mounts) == 1, "the stream does not mount dockyard-object-store as a directory"
    assert mounts[0]["readOnly"] is True
    assert PurePosixPath(mounts[0]["mountPath"]) == PurePosixPath(contract.SECRETS_DIR) / "s3"
    env = {e["name"] for e in container.get("env") or []}
    assert "DOCKYARD_SECRETS_DIR" not in env  # the default, contract.SECRETS_DIR, is where it is mounted


def test_the_settings_the_stream_reads_name_an_s3_store_and_its_endpoint():
    _spec, container = _container()
    maps = {ref["configMapRef"]["name"] for ref in container["envFrom"]}
    data = next(d["data"] for d in DOCS if d.get("kind") == "ConfigMap" and d["metadata"]["name"] in maps)
    assert data["DOCKYARD_STORE"].startswith("s3://") and data["DOCKYARD_S3_ENDPOINT"].startswith("http")


def test_a_store_opened_over_that_layout_takes_its_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKYARD_S3_ENDPOINT", raising=False)
    s3 = tmp_path / "s3"  # what the Secret's volume holds: one file per key
    s3.mkdir()
    (s3 / "access_key_id").write_text("AKIAEXAMPLE\n")
    (s3 / "secret_access_key").write_text("very-secret\n")
    store = open_store("s3://dockyard/tasks", secrets_dir=tmp_path)
    assert isinstance(store, S3Store)
    assert (store._settings["access_key"], store._settings["secret_key"]) == ("AKIAEXAMPLE", "very-secret")
