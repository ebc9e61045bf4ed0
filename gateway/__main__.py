"""`python -m gateway`: serve the model gateway on loopback until SIGTERM.

    python -m gateway --listen 127.0.0.1:8790 --secrets-dir /var/secrets/model --task-id T [--max-tokens N]
    python -m gateway --fd 3 --secrets-dir <data>/secrets/model --grants-dir <data>/gateway/grants   (dev: many tasks)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from agent import contract


def _env(name: str, default=None):
    return os.environ.get(contract.ENV_PREFIX + name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="The model gateway: holds the model key, serves the providers' APIs on loopback.")
    p.add_argument("--listen", default=_env("GATEWAY_LISTEN", f"127.0.0.1:{contract.MODEL_GATEWAY_PORT}"), help="HOST:PORT [DOCKYARD_GATEWAY_LISTEN]")
    p.add_argument("--fd", type=int, help="serve on this inherited listening socket instead (the dev stack binds it)")
    p.add_argument("--secrets-dir", required=True, help="the model key files: api_key or <provider>_api_key, base_url")
    p.add_argument("--grants-dir", help="one grant per task (tokens, limits): a gateway for many tasks")
    p.add_argument("--task-id", help="the one task of this gateway (a pod's sidecar: no token asked)")
    p.add_argument("--max-tokens", type=int, help="that task's limits.max_tokens")
    p.add_argument("--max-cost-usd", type=float, help="that task's limits.max_cost_usd")
    p.add_argument("--state-dir", help="keep each task's totals here, so a restart continues them")
    p.add_argument("--prices", default=_env("MODEL_PRICES", ""), help="model=input/output[/cached] USD per million tokens, comma-separated [DOCKYARD_MODEL_PRICES]")
    p.add_argument("--nats", default=_env("NATS_URL"), help="NATS URL for usage events; none: log them [DOCKYARD_NATS_URL]")
    p.add_argument("--nats-creds", default=_env("NATS_CREDS"), help="a .creds file allowed to publish on the tasks' event subjects [DOCKYARD_NATS_CREDS]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from gateway.app import Gateway, create_app
    from gateway.grants import Grant
    from gateway.publish import Publisher
    from gateway.usage import parse_prices

    if bool(args.grants_dir) == bool(args.task_id):
        print("python -m gateway: give --grants-dir (many tasks) or --task-id (one), not both", file=sys.stderr)
        return contract.EXIT_FATAL
    if args.task_id and not contract.is_valid_task_id(args.task_id):
        print(f"python -m gateway: --task-id {args.task_id!r} is not a task id", file=sys.stderr)
        return contract.EXIT_FATAL
    try:
        prices = parse_prices(args.prices)
    except ValueError as exc:
        print(f"python -m gateway: --prices: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    grant = Grant(args.task_id, max_tokens=args.max_tokens, max_cost_usd=args.max_cost_usd) if args.task_id else None
    # A task's own NATS user may only use its own inbox (functions.core.nats_jwt.task_permissions).
    publisher = Publisher(args.nats, creds_file=args.nats_creds, inbox_prefix=contract.inbox_prefix(args.task_id) if args.task_id else None)
    gw = Gateway(
        secrets_dir=Path(args.secrets_dir),
        publisher=publisher,
        grant=grant,
        grants_dir=Path(args.grants_dir) if args.grants_dir else None,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        prices=prices,
    )
    import uvicorn

    if args.fd is not None:
        where = {"fd": args.fd}
    else:
        host, _, port = args.listen.rpartition(":")
        where = {"host": host or "127.0.0.1", "port": int(port)}
    config = uvicorn.Config(create_app(gw), log_level="warning", access_log=False, proxy_headers=False, lifespan="on",
                            timeout_graceful_shutdown=5, **where)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
