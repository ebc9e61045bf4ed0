"""The model gateway: the one process that holds the model key.

The model, the repository and every command the agent runs are untrusted, so the key is
not in the agent's container, files, environment or command line. The agent calls the
providers' own APIs on loopback (`http://127.0.0.1:8790/<provider>/v1/...` in the pod; the dev
stack's gateway with a per-task token locally) and the gateway adds the key on the way out,
counts each call's tokens, refuses calls past the task's budget, and publishes a `usage` event.

Modules: `app` (routes, forwarding, budgets), `usage` (reading usage from the bytes passing
through, prices), `grants` (per-task tokens and limits; the launcher writes them), `publish`
(usage events to NATS), `__main__` (`python -m gateway`).

Why a thin Starlette + httpx proxy and not LiteLLM's proxy, measured on the shared 2-core dev machine
(load 2-11 while measuring):
* LiteLLM 1.108.7 with `[proxy]` in a fresh venv: 582 MB of site-packages; importing
  `litellm.proxy.proxy_server` took 13.8 s (59 s under heavier load) and left the process at
  323-325 MB RSS before serving anything, eight times the 40 MB per task target, in every pod.
  Its per-call latency was not measured: its memory alone rules it out.
* This gateway: nothing added to the image (Starlette, httpx, uvicorn and nats-py are in the lock
  already), 44 MB RSS with nats-py loaded (41 MB before; aiohttp, which nats-py would load for a
  websocket transport we do not use, kept out: 11 MB), 3.3-4.6 ms of CPU per call, and through it
  a call costs 2.4-3.3 ms more at p50 and 3.5-17 ms more at p99 than calling the upstream directly
  at load 1.7-3.9 (bench/bench_gateway.py; bench/README.md has the runs; heavier load, more at p99).
  What dockyard needs is small: forward four paths, swap one header, read usage, count a budget.

Imports: `agent.contract` only from the project; the agent never imports this package, and
`functions` imports only `gateway.grants` (import-linter contracts in pyproject.toml).
"""
