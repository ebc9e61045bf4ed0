# syntax=docker/dockerfile:1
# The functions image: the four CloudEvent functions and the stream, one Knative
# Service each (knative/functions.yaml, knative/stream.yaml).
# Build from the repository root:
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
FROM python:3.11-slim

RUN groupadd --gid 1000 dockyard \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin dockyard

# Dependencies exactly as locked (versions and hashes from uv.lock).
ARG UV_VERSION=0.13.8
COPY pyproject.toml uv.lock /src/
RUN python -m pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
 && cd /src \
 && uv export --frozen --no-dev --no-emit-project --format requirements-txt --output-file /tmp/requirements.txt \
 && uv pip install --system --no-cache --compile-bytecode --require-hashes -r /tmp/requirements.txt \
 && python -m pip uninstall -y --disable-pip-version-check uv \
 && rm -rf /src /tmp/requirements.txt

COPY agent /app/agent
COPY functions /app/functions
COPY gateway /app/gateway
RUN python -m compileall -q /app

# HOME=/tmp: gunicorn creates its control socket under $HOME/.gunicorn.
ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FUNCTION_SOURCE=/app/functions/main.py

USER 1000:1000
WORKDIR /app
ENTRYPOINT ["functions-framework"]
