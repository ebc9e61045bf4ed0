"""`dockyard dev`: the whole stack in one process on one port.

    POST /                      broker ingress (routes from the Trigger manifests in eventing/)
    GET  /api/stream/{id}       the live trace (SSE), /api/tasks, /healthz: the stream app
    functions                   task_submitted, job_finished, snapshot_due, task_command, in-process
    PingSource                  a timer posting the ping event to the broker on the manifest's schedule
    runtime                     LocalRuntime: restore, snapshotter and agent as child processes; or, with
                                `--runtime podman`, PodmanRuntime: each task's Job as a podman pod
    model gateway               one `python -m gateway` child holding the model key; each task has its own token
    NATS                        an embedded nats-server (unless --nats), store under the data dir
    egress proxy                Squid with the cluster's config, bridged into each command's
                                bubblewrap sandbox (functions/devstack/egress_proxy.py, agent/sandbox.py)

The runtime reports a finished task the way ApiServerSource does in the
cluster: a Job object in a CloudEvent delivered through the broker, so
`job_finished` runs the same code in both places.

Invariants: on a clean stop (Ctrl-C) agents get SIGTERM, stop after their current
step and stay unfinished; the next start over the same data dir resumes them.
Every command an agent runs is in a bubblewrap sandbox whose only way out is the
egress proxy; without a working bwrap, dev refuses to start (it names the fix)
unless `--unsafe-no-sandbox`, and then every task's trace starts with a warning.
"""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Sequence

from agent import contract


def dev_settings(data_dir: Path, nats_url: str, store: str | None = None, base_env: dict | None = None, nats_auth=None,
                 runtime: str = "local", pods: dict[str, str] | None = None):
    """Settings as `Settings.from_env` reads them, with the command line's choices on top
    (as variables, so that the store's default follows the data dir). `nats_auth`: the
    embedded server's trust chain (`nats_auth.NatsAuth`): the functions' user, the
    tracker's, and the account signing key that mints each task's users. `runtime`: local
    or podman; `pods`: for podman, the settings the pods need from this stack (its NATS
    leafnode URL, its egress proxy, its model key directory), by field name, unless set."""
    from functions.core.settings import Settings

    env = dict(os.environ if base_env is None else base_env)
    env[Settings.variable("data_dir")] = str(Path(data_dir).resolve())
    env[Settings.variable("nats_url")] = nats_url
    if nats_auth is not None:
        env[Settings.variable("nats_creds")] = str(nats_auth.creds("functions"))
        env[Settings.variable("tracker_nats_creds")] = str(nats_auth.creds("tracker"))
        env[Settings.variable("nats_account")] = nats_auth.account
        env[Settings.variable("nats_signing_key_file")] = str(nats_auth.signing_key_file)
    env[Settings.variable("runtime")] = runtime
    for name, value in (pods or {}).items():
        env.setdefault(Settings.variable(name), value)
    if not env.get(Settings.variable("api_tokens_file")):
        env[Settings.variable("api_tokens_file")] = str(Path(data_dir).resolve() / "api-tokens")
    if store:
        env[Settings.variable("store")] = store
    return Settings.from_env(env)


def create_dev_app(
    settings,
    *,
    agent_cmd: Sequence[str] | None = None,
    default_model: str | None = None,
    runtime_options: dict[str, Any] | None = None,
    hosts: frozenset[str] | None = None,
    stream_creds: str = "",
):
    """One Starlette app: broker ingress at POST /, the stream app for everything else.

    Every request passes `HostGuard` (Host must be one of `hosts`, None: any; a foreign
    Origin on a POST is refused) and `TokenAuth` (functions/stream/auth.py) first.

    The stream connects to NATS as `stream_creds`'s user (none: the functions' user).

    Its lifespan connects NATS, starts the runtime (resuming unfinished tasks), the
    tracker and the ping timer, and stops them in reverse order."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Mount, Route

    from functions.core import bus
    from functions.stream import app as stream
    from functions.stream.auth import HostGuard, TokenAuth, Tokens
    from functions.devstack.broker import Broker, PingTimer, local_targets, ping_from_manifests
    from functions.devstack.model_gateway import DevGateway
    from functions.handlers import HANDLERS
    from functions.handlers.context import Context
    from functions.runtime import make_runtime

    holder: dict[str, Context] = {}

    async def get_context() -> Context:
        return holder["ctx"]

    broker = Broker.from_manifests(local_targets(HANDLERS, get_context), settings.data_dir)
    ping = PingTimer(broker, ping_from_manifests())

    secrets_dir = Path(settings.data_dir) / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    gateway = DevGateway(Path(settings.data_dir), nats_url=settings.nats_url, nats_creds=settings.nats_creds, prices=settings.model_prices)
    runtime = make_runtime(
        settings,
        emit_job_event=broker.emit,  # the local ApiServerSource: a finished Job goes through the broker
        agent_cmd=agent_cmd,
        default_model=default_model,
        secrets_dir=str(secrets_dir),
        model_gateway=gateway.url,
        gateway_grants=gateway.grants_dir,
        **(runtime_options or {}),
    )
    # The stream redacts what the agents know as secrets (their secrets dir) unless told otherwise.
    known = settings.known_secrets_file or str(secrets_dir)
    stream_app = stream.create_app(settings.model_copy(update={"known_secrets_file": known, "nats_creds": stream_creds or settings.nats_creds}),
                                   run_tracker=True)

    @asynccontextmanager
    async def lifespan(app):
        async with stream_app.router.lifespan_context(stream_app):  # the tracker; closes NATS last
            gateway.start()
            connection = await bus.connect(settings)
            holder["ctx"] = Context(settings, connection, runtime)
            unfinished = [r for r in await connection.registry.list() if r.get("state") not in contract.TERMINAL_STATES]
            await runtime.resume_running(unfinished)
            ping.start()
            try:
                yield
            finally:
                await ping.stop()
                await runtime.close()
                gateway.stop()

    app = Starlette(
        routes=[
            Route("/", broker.ingress, methods=["POST"]),
            Mount("", app=stream_app),
        ],
        middleware=[
            Middleware(HostGuard, hosts=hosts),
            Middleware(TokenAuth, tokens=Tokens(settings.api_tokens_file or None)),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.broker = broker
    app.state.gateway = gateway
    return app


def sandbox_env(unsafe: bool, egress_socket: Path | None) -> dict[str, str]:
    """The variables that tell each agent where its commands run (`python -m agent run --sandbox`)."""
    from agent.sandbox import MODE_BWRAP, MODE_UNSAFE_HOST

    if unsafe:
        return {contract.ENV_PREFIX + "SANDBOX": MODE_UNSAFE_HOST}
    return {contract.ENV_PREFIX + "SANDBOX": MODE_BWRAP, contract.ENV_PREFIX + "EGRESS_SOCKET": str(egress_socket)}


def start_sandboxing(data_dir: Path, unsafe: bool, runtime: str = "local"):
    """Check bwrap and start the egress proxy: (proxy or None, the agents' variables). Raises
    SandboxUnavailable or EgressProxyError, whose messages say what to install. Under podman
    the container is the sandbox: no bwrap, the proxy only (the pods reach it on its port)."""
    from agent.sandbox import check
    from functions.devstack.egress_proxy import EgressProxy

    if unsafe:
        return None, sandbox_env(True, None)
    if runtime == "podman":
        return EgressProxy(data_dir / "egress").start(), {}
    check(egress=True)
    proxy = EgressProxy(data_dir / "egress").start()
    return proxy, sandbox_env(False, proxy.socket)


def banner(url: str, settings, nats_url: str, embedded: bool) -> str:
    from functions.core.settings import mask_url

    return "\n".join(
        [
            f"dockyard dev on {url}",
            f"  token     {Path(settings.data_dir) / 'api-token'} (the CLI reads it from there)",
            f"  data dir  {settings.data_dir}",
            f"  store     {mask_url(settings.store)}",
            f"  NATS      {mask_url(nats_url)}{' (embedded)' if embedded else ''}",
            *([f"  NATS auth {Path(settings.data_dir) / 'nats-auth'} (creds/admin.creds: the nats CLI's user)"] if embedded else []),
            f"  submit    dockyard submit 'your task' --url {url} --follow",
        ]
    )


def main(args) -> int:
    """`dockyard dev`: serve until Ctrl-C (or SIGTERM)."""
    import logging

    from agent.sandbox import UNSAFE_WARNING, SandboxUnavailable
    from functions.devstack.egress_proxy import EgressProxyError

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    unsafe = bool(getattr(args, "unsafe_no_sandbox", False))
    try:
        proxy, agent_env = start_sandboxing(data_dir, unsafe, _runtime(args))
    except (SandboxUnavailable, EgressProxyError) as exc:
        print(f"dockyard dev: refusing to run tasks: {exc}", file=sys.stderr, flush=True)
        return 2
    if unsafe:
        print(f"WARNING: {UNSAFE_WARNING}", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _serve(args, data_dir, proxy, agent_env)
    finally:
        if proxy is not None:
            proxy.stop()


def _runtime(args) -> str:
    """`--runtime`, else DOCKYARD_RUNTIME (local or podman: dev never runs Kubernetes Jobs)."""
    from functions.core.settings import Settings

    chosen = getattr(args, "runtime", None) or os.environ.get(Settings.variable("runtime")) or "local"
    return "local" if chosen == "kubernetes" else chosen


def _serve(args, data_dir: Path, proxy, agent_env: dict[str, str]) -> int:
    import uvicorn

    from functions.devstack import nats_auth
    from functions.devstack.nats_embedded import EmbeddedNats
    from functions.stream.auth import ensure_dev_token, own_hosts
    from functions.stream.serving import quiet_gc

    # The embedded server demands credentials: one trust chain per data dir, made on first start.
    runtime = _runtime(args)
    auth = None if args.nats else nats_auth.ensure(data_dir / "nats-auth")
    nats = None if args.nats else EmbeddedNats(data_dir, config=auth.server_conf, leafnodes=runtime == "podman").start()
    try:
        nats_url = args.nats or nats.url
        pods = {}
        if runtime == "podman":  # what the pods reach on this machine (the runtime names it by the podman host address)
            pods["model_secret_dir"] = str(data_dir / "secrets" / "model")
            if args.model:  # the Job's agent gets it as DOCKYARD_DEFAULT_MODEL renders it
                pods["default_model"] = args.model
            pods["egress_proxy"] = f"http://127.0.0.1:{proxy.port}" if proxy is not None else ""
            if nats is not None:
                pods["nats_leaf_url"] = nats.leafnode_url
        settings = dev_settings(data_dir, nats_url, args.store, nats_auth=auth, runtime=runtime, pods=pods)
        token = ensure_dev_token(data_dir, Path(settings.api_tokens_file))
        app = create_dev_app(settings, default_model=args.model, hosts=own_hosts(args.host, args.port),
                             stream_creds=str(auth.creds("stream")) if auth else "",
                             runtime_options={"env": {**os.environ, **agent_env}})
        url = f"http://{args.host}:{args.port}"
        print(banner(url, settings, nats_url, embedded=nats is not None), flush=True)
        sandbox = "none (--unsafe-no-sandbox)" if proxy is None else f"bubblewrap; egress through Squid on 127.0.0.1:{proxy.port} ({proxy.log})"
        if runtime == "podman":
            sandbox = f"podman pods ({settings.agent_image}); egress through Squid on 127.0.0.1:{proxy.port}" if proxy else "podman pods, no egress proxy"
        print(f"  sandbox   {sandbox}", flush=True)
        print(f"  cockpit   {url}/?token={token}", flush=True)
        print(f"  models    {app.state.gateway.url} (the model gateway; key files in {app.state.gateway.secrets_dir})", flush=True)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # X-Forwarded-For is believed only from DOCKYARD_TRUSTED_PROXIES
            lifespan="on",
            timeout_graceful_shutdown=5,  # open SSE streams must not hold the stop up
        )
        server = uvicorn.Server(config)
        quiet_gc()  # many open streams: see functions.stream.serving.quiet_gc
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the stop was clean
            pass
        return 0 if server.started else 1
    finally:
        if nats is not None:
            nats.stop()
