# syntax=docker/dockerfile:1
# The agent image: one image, the five containers of an agent Job
#   python -m agent restore | snapshotter | run, python -m gateway (the model gateway sidecar)
#   and nats-leaf (python hands its configuration to nats-server and becomes it)
# Built by scripts/build-images (podman, on a Debian base made by mmdebstrap: BASE_IMAGE), or
# with a registry, from the repository root, mounting the build machine's CA bundle for pip/uv:
#   docker build -f images/agent.Dockerfile -t dev.local/dockyard-agent:0.1.0 .
#
# Runs as uid 1000 on a read-only root filesystem. The Job mounts the only
# writable places: the workspace PVC at /workspace and emptyDirs at /home/agent
# and /tmp. Nothing is written elsewhere at run time: bytecode is compiled at
# build time and never written after (PYTHONDONTWRITEBYTECODE), and HOME (git's
# config, pip's cache, `pip install --user` via PYTHONUSERBASE) is /home/agent.
#
# Python is a venv at /opt/venv, first on PATH: Debian's own python3 is externally
# managed (PEP 668), and the venv works the same on python:3.11-slim. The Job sets
# PATH itself (settings.DEFAULT_IMAGE_PATH must match the PATH below).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# git: the agent clones task repositories and commits its work. apt-get runs only
# when the base lacks it (scripts/build-images' base has it).
RUN if ! command -v git >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends git ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

RUN groupadd --gid 1000 agent \
 && useradd --uid 1000 --gid 1000 --home-dir /home/agent --create-home --shell /usr/sbin/nologin agent \
 && mkdir -p /workspace \
 && chown 1000:1000 /workspace

# Dependencies exactly as locked (versions and hashes from uv.lock) into /opt/venv, but
# for the functions' own (the Kubernetes client, functions-framework, cloudevents, and what
# only they need: over 150 MB): the agent and the gateway never import functions/
# (import-linter), and tests/images imports every module of theirs in this image.
# --system-site-packages keeps the user site on, so `pip install --user` works (into
# PYTHONUSERBASE). uv lives in a throwaway venv of this one RUN, and pip's and uv's
# downloads in a cache mount (shared by both images' builds): neither is in any layer.
# pip and uv verify TLS with the CA bundle at the system path, which the build
# MOUNTS there (the build machine's, never copied); PIP_INDEX_URL/UV_INDEX_URL pass an
# index through. The agent's commands run with the system PATH (agent/execute.py), where
# `python` and `pip` are wrappers that exec the venv's (a symlink would lose the venv;
# python:3.11-slim's own are removed first, not written through: its python is a symlink).
ARG UV_VERSION=0.13.8
ARG PIP_INDEX_URL=
ARG UV_INDEX_URL=
COPY pyproject.toml uv.lock /src/
RUN --mount=type=cache,target=/var/cache/dockyard-build \
    export PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
      UV_SYSTEM_CERTS=1 UV_CACHE_DIR=/var/cache/dockyard-build/uv UV_LINK_MODE=copy \
      PIP_CACHE_DIR=/var/cache/dockyard-build/pip PIP_DISABLE_PIP_VERSION_CHECK=1 \
 && if [ -z "${PIP_INDEX_URL:-}" ]; then unset PIP_INDEX_URL; fi \
 && if [ -z "${UV_INDEX_URL:-}" ]; then unset UV_INDEX_URL; fi \
 && python3 -m venv --system-site-packages /opt/venv \
 && python3 -m venv /tmp/uv \
 && /tmp/uv/bin/pip install -q "uv==${UV_VERSION}" \
 && cd /src \
 && /tmp/uv/bin/uv export --frozen --no-dev --extra openai --extra anthropic --no-emit-project \
      --prune kubernetes --prune functions-framework --prune cloudevents \
      --format requirements-txt --output-file /tmp/requirements.txt \
 && /tmp/uv/bin/uv pip install -q --python /opt/venv/bin/python --compile-bytecode \
      --require-hashes -r /tmp/requirements.txt \
 && /tmp/uv/bin/uv pip uninstall -q --python /opt/venv/bin/python setuptools \
 && rm -rf /tmp/uv /src /tmp/requirements.txt /root/.cache \
 && rm -f /usr/local/bin/python /usr/local/bin/pip \
 && printf '#!/bin/sh\nexec /opt/venv/bin/%s "$@"\n' python > /usr/local/bin/python \
 && printf '#!/bin/sh\nexec /opt/venv/bin/%s "$@"\n' pip > /usr/local/bin/pip \
 && chmod 755 /usr/local/bin/python /usr/local/bin/pip

ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/agent \
    PYTHONUSERBASE=/home/agent/.local \
    PATH=/home/agent/.local/bin:/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The code last: a code change rebuilds only these layers.
COPY agent /app/agent
COPY functions /app/functions
COPY gateway /app/gateway
RUN python -m compileall -q /app

USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "agent"]
CMD ["--help"]
