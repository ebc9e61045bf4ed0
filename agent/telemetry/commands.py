"""The agent's side of `cmd.agent.<id>`: requests in, the callback's answer out, over nats-py.

Invariants:
* The callback runs on the telemetry thread and must be quick and thread-safe;
  a dict it returns is the reply, None means no reply (another subscriber
  answers, e.g. the snapshotter for `op: snapshot`).
* Every request that should get an answer gets one: bad JSON and an exception in
  the callback are answered `{"ok": false, "error": ...}`.
* Replies are redacted like everything else that leaves the agent.
* Set before or after the connection exists, and kept across reconnects: each
  new connection subscribes again (`attach`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent import contract

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from agent.telemetry.records import Encoder

Callback = Callable[[dict], "dict | None"]


class CommandServer:
    def __init__(self, task_id: str, encoder: Encoder, on_error: Callable[[str], None]):
        self.subject = contract.subject_cmd(task_id)
        self.callback: Callback | None = None
        self._encoder = encoder
        self._on_error = on_error
        self._nc: Client | None = None
        self._subscribed = False

    async def attach(self, nc: Client) -> None:
        self._nc, self._subscribed = nc, False
        await self.subscribe()

    def detach(self) -> None:
        self._nc, self._subscribed = None, False

    async def subscribe(self) -> None:
        """Subscribe on the current connection once a callback is set (idempotent)."""
        nc = self._nc
        if nc is None or nc.is_closed or self.callback is None or self._subscribed:
            return
        self._subscribed = True
        await nc.subscribe(self.subject, cb=self._on_msg)

    def answer(self, payload: bytes) -> dict | None:
        """The reply to one request, or None for no reply."""
        try:
            request = json.loads(payload)
            if not isinstance(request, dict):
                raise ValueError("a command is a JSON object")
        except ValueError as exc:
            return {"ok": False, "error": f"bad command: {exc}"}
        callback = self.callback
        if callback is None:
            return None
        try:
            response: Any = callback(request)
        except Exception as exc:
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return response if isinstance(response, dict) else None

    async def _on_msg(self, msg: Msg) -> None:
        response = self.answer(msg.data)
        if response is None or not msg.reply or self._nc is None:
            return
        try:
            await self._nc.publish(msg.reply, self._encoder.encode_reply(response))
        except Exception as exc:  # the connection went away: the requester times out and retries
            self._on_error(f"command reply: {exc!r}")
