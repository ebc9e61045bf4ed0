"""The model gateway: the one process that holds the model key.

The model, the repository and every command the agent runs are untrusted, so the key is
not in the agent's container, files, environment or command line. The agent calls the
providers' own APIs on loopback (`http://127.0.0.1:8790/<provider>/v1/...` in the pod; the dev
stack's gateway with a per-task token locally) and the gateway adds the key on the way out,
counts each call's tokens, refuses calls past the task's budget, and publishes a `usage` event.

Modules: `app` (routes, forwarding, budgets), `usage` (reading usage from the bytes passing
through, prices), `grants` (per-task tokens and limits; the launcher writes them), `publish`
(usage events to NATS), `__main__` (`python -m gateway`).

Why a thin Starlette + httpx proxy and not LiteLLM's proxy (bench/bench_gateway.py, docs/SECURITY.md):
both libraries are already in the lock and the image; LiteLLM's proxy (`litellm[proxy]`) is a
large install and a large process for what dockyard needs here (forward three paths, add one
header, read usage, count a budget). The figures are in the README's "Model gateway" section.

Imports: `agent.contract` only from the project; the agent never imports this package, and
`functions` imports only `gateway.grants` (import-linter contracts in pyproject.toml).
"""
