"""The agent's trace: events and log records to NATS JetStream over nats-py, never in the agent's way.

    from agent.telemetry import NatsAuth, Telemetry

Modules, one concept each:
* `client`: `Telemetry`, the callers' side (bounded queue, counted drops, start,
  close) and the telemetry thread (connect, reconnect, stdout when NATS is away);
* `records`: what callers enqueue and the JSON it becomes (redacted, truncated);
* `publisher`: acknowledged, ordered, lossless publishing into stream AGENT,
  resending with the original `Nats-Msg-Id` after a reconnect;
* `commands`: the `cmd.agent.<id>` request/reply the agent answers;
* `connection`: servers, credentials (URL user info, .creds file, nkey seed) and
  one nats-py connection at a time.

Why nats-py, and how it is used. Until issue #8 this was a hand-written NATS
client (`_Wire`; its docstring measured 73,000-131,000 records/s), built for a
50,000 records/s target that was ours and too high: an agent emits well under
1,000 records/s. The targets now: >= 10,000 records/s sustained with none lost,
<= 20 us added per record on the agent's thread, order kept and nothing lost
across a NATS restart, nkeys/JWT credentials (nats-py speaks them). Figures from
`bench/bench_logs.py` on the 2-core dev machine, shared and loaded (load
average ~3), three runs:
* publishing: `nc.publish` with a reply subject under one inbox plus one ack
  subscription, 57,600-63,300 records/s for encode + redact + publish + ack;
  the baseline in the same runs, nats-py's `js.publish_async` (a future and a
  semaphore per record) on pre-encoded payloads, 33,500-44,000 records/s;
* sustained: 12,000 records/s offered for 5 s, all 60,000 acked and in the
  stream; with nats-server restarted halfway, 60,000 of 60,000, in order, no
  duplicate;
* the agent's thread: `logger.info` through the handler 9.0-10.1 us wall (4.5
  us CPU) against 5.1-6.4 us with no handler and 9.4-14.6 us with a FileHandler;
* why acks at all: 1,000,000 plain `nc.publish` calls without acks left 23.6%
  of them out of the stream (the server's ingest queue overflowed silently).
Still written here: the in-flight window and its resend in order (nats-py's own
reconnect would break the order, see `connection`), the stdout fallback, and
the queue the agent's threads append to without waiting.
"""

from agent.telemetry.client import Telemetry
from agent.telemetry.connection import CredentialsError, NatsAuth

__all__ = ["CredentialsError", "NatsAuth", "Telemetry"]
