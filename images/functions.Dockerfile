# syntax=docker/dockerfile:1
# The functions image: the four CloudEvent functions and the stream, one Knative
# Service each (knative/functions.yaml, knative/stream.yaml).
# Built by scripts/build-images (podman, on a Debian base made by mmdebstrap: BASE_IMAGE), or
# with a registry, from the repository root, mounting the build machine's CA bundle for pip/uv:
#   docker build -f images/functions.Dockerfile -t dev.local/dockyard-functions:0.1.0 .
#
# A function Service sets FUNCTION_TARGET (task_submitted, job_finished,
# snapshot_due, task_command); functions-framework reads it and FUNCTION_SOURCE
# from the environment and listens on $PORT (Knative sets 8080). The targets are
# registered with @functions_framework.aio.http, so functions-framework 3.10 serves
# them as ASGI (Starlette under gunicorn's uvicorn worker) without --asgi, and the
# decorator fixes the signature type to http: the handlers parse the CloudEvent
# themselves, to answer bad input with 4xx (functions/main.py). The stream Service
# replaces the command (knative/stream.yaml).
#
# Runs as uid 1000 on a read-only root filesystem with an emptyDir at /tmp.
# Python is a venv at /opt/venv, first on PATH (see agent.Dockerfile for why).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

RUN groupadd --gid 1000 dockyard \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin dockyard

# Dependencies exactly as locked (versions and hashes from uv.lock); uv only for this RUN,
# downloads in a cache mount, TLS verified with the mounted CA bundle (see agent.Dockerfile).
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
 && python3 -m venv /opt/venv \
 && python3 -m venv /tmp/uv \
 && /tmp/uv/bin/pip install -q "uv==${UV_VERSION}" \
 && cd /src \
 && /tmp/uv/bin/uv export --frozen --no-dev --no-emit-project --format requirements-txt --output-file /tmp/requirements.txt \
 && /tmp/uv/bin/uv pip install -q --python /opt/venv/bin/python --compile-bytecode \
      --require-hashes -r /tmp/requirements.txt \
 && /tmp/uv/bin/uv pip uninstall -q --python /opt/venv/bin/python setuptools \
 && rm -rf /tmp/uv /src /tmp/requirements.txt /root/.cache

# HOME=/tmp: gunicorn creates its control socket under $HOME/.gunicorn.
ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FUNCTION_SOURCE=/app/functions/main.py \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

COPY agent /app/agent
COPY functions /app/functions
COPY gateway /app/gateway
RUN python -m compileall -q /app

USER 1000:1000
WORKDIR /app
ENTRYPOINT ["functions-framework"]
