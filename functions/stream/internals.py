"""The one place the stream uses a library's private parts: uvicorn's transport of a connection.

Invariant: nothing else in `functions/` reads or writes a private attribute of
uvicorn or nats-py. Each use here names the version it was written for
(`WRITTEN_FOR`); tests/functions/stream/test_internals.py fails when the
installed version differs and says what to re-check, and `python -m
functions.stream` logs the same at start-up. A miss at run time degrades (None)
and never fails a request.

Why it is needed: ASGI has no way to abort a connection, and a graceful close
waits for the peer to read what is queued for it, which a stalled peer never
does (docs/stream.md, "Send timeout"). uvicorn calls the app with `send` bound
to its request cycle, whose `transport` attribute is the connection's asyncio
transport; `StreamApp` notes it in the scope under TRANSPORT_KEY before any
middleware wraps `send`. Mounted inside another app (the dev stack), `send` is
already wrapped, nothing is found, and a stalled client's socket closes when
the peer reads or the kernel gives up.

What went instead of the other private uses (no helper needed):
- nats-py's `sub._consumer` (the consumer's current name, to delete it): the
  public `await sub.consumer_info()` gives it.
- nats-py's `sub._sub._jsi._sseq` (where an ordered consumer resumes if it has
  delivered nothing yet): the feed's consumer starts at the task's newest
  message, which is delivered at once and dropped, so nats-py resumes after it
  (functions/stream/feed.py).
- uvicorn's server found through the SIGTERM handler's `__self__` (to end
  streams on shutdown): the app chains its own handler in front of the
  server's (functions/stream/serving.py, `on_shutdown_signal`).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TRANSPORT_KEY = "dockyard.transport"  # scope key: the connection's asyncio transport, or None

WRITTEN_FOR = {"uvicorn": "0.54.0"}  # distribution name -> the version the code below was checked against
RECHECK = {
    "uvicorn": (
        "that uvicorn still calls the app with `send` bound to its RequestResponseCycle (uvicorn/protocols/http/"
        "h11_impl.py and httptools_impl.py, run_asgi) and that the cycle's `transport` is the connection's asyncio "
        "transport; then run tests/functions/stream and update WRITTEN_FOR in functions/stream/internals.py"
    ),
}


def transport_of(send):
    """The asyncio transport of the connection `send` answers on, when the server is uvicorn; else None."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not (hasattr(transport, "abort") and hasattr(transport, "get_extra_info")):
        return None
    return transport


def version_mismatches() -> list[str]:
    """One sentence per library whose installed version is not the one this module was written for."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name, written_for in WRITTEN_FOR.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # not installed: nothing here is used
        if installed != written_for:
            found.append(f"{name} {installed} is installed, functions/stream/internals.py was written for {written_for}: re-check {RECHECK[name]}")
    return found
