"""The model gateway's HTTP app: the providers' APIs on loopback, the key added on the way out.

    POST /{provider}/v1/chat/completions | /responses        OpenAI-style (openai, ollama, vllm, openai-compatible)
    POST /anthropic/v1/messages | /messages/count_tokens     Anthropic
    GET  /healthz

Invariants
- The key never goes back: the caller's `Authorization`/`x-api-key` (the task's token) is dropped,
  the provider's header with the key read from the secrets directory is added, and only an
  allowlist of request headers is passed on. Only the paths above are forwarded: the key cannot
  be used for files, batches, fine-tuning or administration through the gateway.
- Streaming is passed through chunk by chunk as it arrives (`aiter_raw`), never buffered; the
  usage meter (gateway.usage) reads a copy. `Accept-Encoding: identity` upstream keeps the bytes readable.
- Budgets: before forwarding, a task whose totals reached `max_tokens` or `max_cost_usd` is refused
  with 402, the provider's error shape, type `budget_exhausted` and a message naming the limit
  (header `x-dockyard-refusal: budget_exhausted`). A call under the limit is forwarded whole, so the
  last call may overshoot by its own size. Usage is counted when the response ends, also when the
  caller hangs up mid-stream.
- Every call that reaches the provider publishes a `usage` event on the task's subject (gateway.publish).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent import contract
from gateway import grants
from gateway.grants import Grant
from gateway.publish import Publisher
from gateway.usage import Meter, Price, Totals, Usage, price_of

log = logging.getLogger("gateway")

OPENAI, ANTHROPIC = "openai", "anthropic"
# provider -> (API style, default upstream base with its /v1); `<secrets>/<provider>_base_url` or `base_url` replaces it.
PROVIDERS = {
    "openai": (OPENAI, "https://api.openai.com/v1"),
    "anthropic": (ANTHROPIC, "https://api.anthropic.com/v1"),
    "ollama": (OPENAI, "http://ollama:11434/v1"),
    "vllm": (OPENAI, "http://vllm:8000/v1"),
    "openai-compatible": (OPENAI, None),
}
PATHS = {OPENAI: ("chat/completions", "responses"), ANTHROPIC: ("messages", "messages/count_tokens")}
FORWARDED_HEADERS = ("content-type", "accept", "user-agent", "anthropic-version", "anthropic-beta", "openai-beta", "idempotency-key")
DROPPED_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-authenticate", "upgrade", "trailer", "te"}
MAX_REQUEST_BYTES = 16 * 1024 * 1024
REFUSAL_HEADER = "x-dockyard-refusal"
BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass
class Gateway:
    """What the app needs: where the key files and grants are, the prices, the publisher.

    `grant`: the one task of a pod's sidecar (no token asked); else `grants_dir` holds one grant per task."""

    secrets_dir: Path
    publisher: Publisher
    grant: Grant | None = None
    grants_dir: Path | None = None
    state_dir: Path | None = None  # per-task totals survive a restart of the gateway here
    prices: dict[str, Price] = field(default_factory=dict)
    timeout_seconds: float = 600.0
    totals: dict[str, Totals] = field(default_factory=dict)
    _files: dict[Path, tuple[int, str | None]] = field(default_factory=dict)
    _grants: dict[str, tuple[int, Grant | None]] = field(default_factory=dict)

    # --- files, read again only when they change ---------------------------------------
    def secret(self, *names: str) -> str | None:
        for name in names:
            path = self.secrets_dir / name
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            cached = self._files.get(path)
            if cached is None or cached[0] != mtime:
                try:
                    cached = (mtime, path.read_text().strip() or None)
                except OSError:
                    cached = (mtime, None)
                self._files[path] = cached
            if cached[1]:
                return cached[1]
        return None

    def upstream(self, provider: str) -> tuple[str | None, str | None]:
        """(base URL with /v1, key) of `provider`."""
        style, base = PROVIDERS[provider]
        configured = self.secret(f"{provider}_base_url", "base_url")
        if configured:
            base = configured.rstrip("/")
            if style == ANTHROPIC and not base.endswith("/v1"):
                base += "/v1"  # the Anthropic SDK's base URL has no /v1
        return base, self.secret(f"{provider}_api_key", "api_key")

    def authorize(self, request: Request) -> Grant | None:
        if self.grant is not None and not self.grant.token_sha256:
            return self.grant
        token = _token(request)
        task_id = grants.task_of(token) if token else None
        if task_id is None:
            return None
        grant = self.grant if self.grant is not None and self.grant.task_id == task_id else self._read_grant(task_id)
        return grant if grant is not None and grants.matches(grant, token) else None

    def _read_grant(self, task_id: str) -> Grant | None:
        if self.grants_dir is None:
            return None
        try:
            mtime = grants.grant_path(self.grants_dir, task_id).stat().st_mtime_ns
        except OSError:
            return None
        cached = self._grants.get(task_id)
        if cached is None or cached[0] != mtime:
            cached = (mtime, grants.read_grant(self.grants_dir, task_id))
            self._grants[task_id] = cached
        return cached[1]

    # --- totals -------------------------------------------------------------------------
    def totals_of(self, task_id: str) -> Totals:
        totals = self.totals.get(task_id)
        if totals is None:
            totals = Totals()
            if self.state_dir is not None:
                try:
                    totals = Totals.from_dict(json.loads((self.state_dir / f"{task_id}.usage.json").read_text()))
                except (OSError, ValueError, TypeError):
                    pass
            self.totals[task_id] = totals
        return totals

    def save(self, task_id: str) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.state_dir / f"{task_id}.usage.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.totals_of(task_id).to_dict()))
        os.replace(tmp, path)


def refusal(grant: Grant, totals: Totals) -> str | None:
    """Why the next call is refused, naming the limit; None while under every limit."""
    if grant.max_tokens is not None and totals.tokens >= grant.max_tokens:
        return f"the task's token budget is spent: limits.max_tokens = {grant.max_tokens}, {totals.tokens} tokens used"
    if grant.max_cost_usd is not None and totals.cost_usd >= grant.max_cost_usd:
        return f"the task's cost budget is spent: limits.max_cost_usd = {grant.max_cost_usd:g}, ${totals.cost_usd:.4f} used"
    return None


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or None


def error(style: str, status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """An error in the shape the caller's SDK reads."""
    if style == ANTHROPIC:
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class Call:
    """One model call on its way through: who, where, what."""

    provider: str
    style: str
    path: str
    grant: Grant
    started: float
    model: str = ""
    body: bytes = b""
    stream: bool = False


def admit(gw: Gateway, request: Request, started: float) -> Call | Response:
    """The call, or the answer that refuses it: unknown provider or path (404), no valid token (401), a spent budget (402)."""
    provider, path = request.path_params["provider"], request.path_params["path"]
    if provider not in PROVIDERS:
        return error(OPENAI, 404, "not_found", f"unknown provider {provider[:40]!r}; use one of {', '.join(PROVIDERS)}")
    style = PROVIDERS[provider][0]
    if path not in PATHS[style]:
        return error(style, 404, "not_found", f"the gateway forwards only {', '.join('/v1/' + p for p in PATHS[style])} for {provider}")
    grant = gw.authorize(request)
    if grant is None:
        return error(style, 401, "authentication_error", "unknown or missing task token for the model gateway")
    totals = gw.totals_of(grant.task_id)
    why = refusal(grant, totals)
    if why is not None:
        totals.refused += 1
        _save(gw, grant.task_id)
        gw.publisher.publish(grant.task_id, _event(grant, provider, "", path, Usage(), 0.0, 0.0, totals, status=402, refused=why))
        return error(style, 402, BUDGET_EXHAUSTED, why, {REFUSAL_HEADER: BUDGET_EXHAUSTED})
    return Call(provider, style, path, grant, started)


def read_body(call: Call, body: bytes) -> Response | None:
    """Take the request's model and stream flag; a streamed chat completion is asked to report its usage."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return error(call.style, 400, "invalid_request_error", "the request body must be a JSON object")
    call.model, call.stream, call.body = str(data.get("model") or "")[:200], data.get("stream") is True, body
    if call.style == OPENAI and call.path == "chat/completions" and call.stream:
        options = data.get("stream_options") if isinstance(data.get("stream_options"), dict) else {}
        if options.get("include_usage") is not True:  # the usage arrives in the last chunk only when asked
            data["stream_options"] = {**options, "include_usage": True}
            call.body = json.dumps(data).encode()
    return None


def upstream_request(gw: Gateway, call: Call, request: Request, client: httpx.AsyncClient) -> httpx.Request | Response:
    """The request to the provider: an allowlist of the caller's headers, the key added, never the token."""
    base, key = gw.upstream(call.provider)
    if not base:
        return error(call.style, 502, "gateway_configuration", f"no upstream for {call.provider}: put its base URL in the gateway's secret file base_url")
    headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
    headers["accept-encoding"] = "identity"
    if key:
        headers.update({"x-api-key": key} if call.style == ANTHROPIC else {"authorization": f"Bearer {key}"})
    url = f"{base}/{call.path}" + (f"?{request.url.query}" if request.url.query else "")
    return client.build_request("POST", url, content=call.body, headers=headers)


def create_app(gw: Gateway) -> Starlette:
    clients: list[httpx.AsyncClient] = []

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def forward(request: Request) -> Response:
        call = admit(gw, request, time.perf_counter())
        if isinstance(call, Response):
            return call
        if int(request.headers.get("content-length") or 0) > MAX_REQUEST_BYTES:
            return error(call.style, 413, "request_too_large", f"request bodies are limited to {MAX_REQUEST_BYTES} bytes")
        refused = read_body(call, await request.body())
        outgoing = refused or upstream_request(gw, call, request, clients[0])
        if isinstance(outgoing, Response):
            return outgoing
        try:
            upstream = await clients[0].send(outgoing, stream=True)
        except httpx.TimeoutException:
            return error(call.style, 504, "upstream_timeout", f"{call.provider} did not answer in time")
        except httpx.HTTPError as exc:
            return error(call.style, 502, "upstream_unreachable", f"cannot reach {call.provider}: {type(exc).__name__}")
        return await relay(gw, call, upstream)

    @asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(gw.timeout_seconds, connect=15.0)
        clients.append(httpx.AsyncClient(timeout=timeout, trust_env=True, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)))
        try:
            yield
        finally:
            await clients[0].aclose()
            await gw.publisher.close()

    return Starlette(routes=[Route("/healthz", healthz), Route("/{provider}/v1/{path:path}", forward, methods=["POST"])], lifespan=lifespan)


async def relay(gw: Gateway, call: Call, upstream: httpx.Response) -> Response:
    """The provider's answer back to the caller: a stream chunk by chunk, a whole JSON answer in one write."""
    meter = Meter(upstream.headers.get("content-type", ""))
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED_RESPONSE_HEADERS}
    if not meter.stream:  # a whole JSON answer is of no use in parts: one read, one write
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            return error(call.style, 502, "upstream_unreachable", f"{call.provider} broke off its answer: {type(exc).__name__}")
        finally:
            await upstream.aclose()
        meter.feed(content)
        headers.pop("content-encoding", None)  # aread() decoded it, if the upstream encoded it after all
        _account(gw, call, meter, upstream.status_code)
        return Response(content, status_code=upstream.status_code, headers=headers)

    async def chunks():
        try:
            async for chunk in upstream.aiter_raw():
                meter.feed(chunk)
                yield chunk
        finally:  # also when the caller hung up (cancelled here): what was seen is counted, before any await
            _account(gw, call, meter, upstream.status_code)
            await upstream.aclose()

    return StreamingResponse(chunks(), status_code=upstream.status_code, headers=headers)


def _account(gw: Gateway, call: Call, meter: Meter, status: int) -> None:
    """Count the call and publish its usage event (synchronous: it runs also when the caller hung up)."""
    usage = meter.usage()
    cost = usage.cost(price_of(gw.prices, call.model))
    totals = gw.totals_of(call.grant.task_id)
    totals.add(usage, cost)
    latency = time.perf_counter() - call.started
    event = _event(call.grant, call.provider, call.model, call.path, usage, cost, latency, totals, status=status, stream=call.stream)
    gw.publisher.publish(call.grant.task_id, event)
    _save(gw, call.grant.task_id)


def _save(gw: Gateway, task_id: str) -> None:
    """Write the task's totals after this response has gone out (the next loop turn), never in its way."""
    if gw.state_dir is not None:
        asyncio.get_running_loop().call_soon(_write_totals, gw, task_id)


def _write_totals(gw: Gateway, task_id: str) -> None:
    try:
        gw.save(task_id)
    except OSError as exc:
        log.warning("gateway: cannot save the totals of %s: %s", task_id, exc)


def _event(grant: Grant, provider: str, model: str, path: str, usage: Usage, cost: float, latency: float, totals: Totals, **extra) -> dict:
    limits = {k: v for k, v in (("max_tokens", grant.max_tokens), ("max_cost_usd", grant.max_cost_usd)) if v is not None}
    return {
        "type": contract.EV_USAGE,
        "task_id": grant.task_id,
        "ts": contract.iso_utc(),
        "provider": provider,
        "model": model,
        "api": path,
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cached_tokens": usage.cached,
        "tokens": usage.total,
        "reported": usage.reported,
        "response_id": usage.response_id,
        "cost_usd": round(cost, 6),
        "latency_ms": round(latency * 1000, 1),
        "totals": totals.to_dict(),
        "limits": limits,
        **extra,
    }
