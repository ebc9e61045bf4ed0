"""The versions dockyard targets, in one place.

The README's install steps (`export KNATIVE=...`) and the CRD schemas vendored under
tests/manifests/schemas/ (see its README) must agree with these; tests/manifests/test_crd_schemas.py
checks both.
"""

from __future__ import annotations

# Knative 1.20 needs Kubernetes >= 1.32 (knative/serving and knative/eventing release notes, docs/DESIGN.md).
KUBERNETES_MIN = "1.32"
# Release tags of knative/serving, knative/eventing and knative-extensions/eventing-natss.
KNATIVE_SERVING = "knative-v1.20.0"
KNATIVE_EVENTING = "knative-v1.20.0"
EVENTING_NATSS = "knative-v1.20.0"
# What the README exports as $KNATIVE (the tag without its "knative-" prefix).
KNATIVE = "v1.20.0"
