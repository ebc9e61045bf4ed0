# syntax=docker/dockerfile:1
# The agent image: one image, the four containers of an agent Job
#   python -m agent restore | snapshotter | run, and python -m gateway (the model gateway sidecar)
# Build from the repository root:
#   docker build -f images/agent.Dockerfile -t dev.local/dockyard-agent:0.1.0 .
#
# Runs as uid 1000 on a read-only root filesystem. The Job mounts the only
# writable places: the workspace PVC at /workspace and emptyDirs at /home/agent
# and /tmp. Nothing is written elsewhere at run time: bytecode is compiled at
# build time and never written after (PYTHONDONTWRITEBYTECODE), and HOME (git's
# config, pip's cache, `pip install --user` via PYTHONUSERBASE) is /home/agent.
FROM python:3.11-slim

# git: the agent clones task repositories and commits its work.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 agent \
 && useradd --uid 1000 --gid 1000 --home-dir /home/agent --create-home --shell /usr/sbin/nologin agent \
 && mkdir -p /workspace \
 && chown 1000:1000 /workspace

# Dependencies exactly as locked (versions and hashes from uv.lock), into the image's
# Python, so `python` on the default PATH has them (the Job sets PATH, see factory.py).
ARG UV_VERSION=0.13.8
COPY pyproject.toml uv.lock /src/
RUN python -m pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
 && cd /src \
 && uv export --frozen --no-dev --extra openai --extra anthropic --no-emit-project \
      --format requirements-txt --output-file /tmp/requirements.txt \
 && uv pip install --system --no-cache --compile-bytecode --require-hashes -r /tmp/requirements.txt \
 && python -m pip uninstall -y --disable-pip-version-check uv \
 && rm -rf /src /tmp/requirements.txt

# The code last: a code change rebuilds only this layer.
COPY agent /app/agent
COPY functions /app/functions
COPY gateway /app/gateway
RUN python -m compileall -q /app

ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/agent \
    PYTHONUSERBASE=/home/agent/.local \
    PATH=/home/agent/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "agent"]
CMD ["--help"]
