"""Issue 11, defect 2: a Knative Service's secret files must be readable by its container's user.

Knative rejects a pod-level securityContext (no fsGroup) by default, so a Secret volume's files are
root:root; the containers run as UID 1000. A mode without the "other" read bit (0440, 0400) means
EACCES at the first read: `job_finished` could not open the object store's credentials.
"""

from __future__ import annotations

import pytest

from tests.manifests import KNATIVE_DIR, documents, knative_services, pod_template

SERVICES = knative_services(documents(KNATIVE_DIR))
SECRET_DEFAULT_MODE = 0o644  # Kubernetes' default for a secret volume without defaultMode


def _secret_files(pod_spec: dict):
    """(volume, path, mode) of every file a Secret (or a projected Secret) puts in the pod."""
    for volume in pod_spec.get("volumes") or []:
        if "secret" in volume:
            sources, default = [volume["secret"]], volume["secret"].get("defaultMode", SECRET_DEFAULT_MODE)
        elif "projected" in volume:
            default = volume["projected"].get("defaultMode", SECRET_DEFAULT_MODE)
            sources = [s["secret"] for s in volume["projected"].get("sources", []) if "secret" in s]
        else:
            continue
        for source in sources:
            for item in source.get("items") or [{"path": "*", "mode": default}]:
                yield volume["name"], item["path"], item.get("mode", default)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_secret_file_of_a_service_is_readable_without_an_fsgroup(service):
    spec = pod_template(SERVICES[service].body)["spec"]
    assert "fsGroup" not in (spec.get("securityContext") or {})  # what makes "other" the bit that counts
    unreadable = [(v, p, oct(m)) for v, p, m in _secret_files(spec) if not m & 0o004]
    assert unreadable == [], f"{service}: UID 1000 gets EACCES on {unreadable}"
