"""`python -m functions.stream [--port P] [--no-tracker]`: the stream Service as deployed (the app and the tracker, under uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from functions.core.settings import Settings
from functions.stream import internals
from functions.stream.app import create_app
from functions.stream.serving import quiet_gc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m functions.stream", description="The live trace of tasks over Server-Sent Events, the task listings and the cockpit.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")), help="default: $PORT or 8080")
    parser.add_argument("--no-tracker", action="store_true", help="do not run the registry tracker (one per deployment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for mismatch in internals.version_mismatches():
        logging.getLogger("functions.stream").warning("%s", mismatch)
    settings = Settings.from_env()
    print(settings.describe(), file=sys.stderr, flush=True)
    app = create_app(settings, run_tracker=not args.no_tracker)
    quiet_gc()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, proxy_headers=False)  # X-Forwarded-For: DOCKYARD_TRUSTED_PROXIES
    return 0


if __name__ == "__main__":
    sys.exit(main())
