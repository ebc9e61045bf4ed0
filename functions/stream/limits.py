"""How many streams one client address may hold open at once (`stream_max_per_ip`; 0: no cap).

Invariant: every admitted stream is counted once and released once (the
release is idempotent), so the count of an address is the number of its
streams open right now. A request over the cap gets 429 `{"error", "field":
"client"}` with `Retry-After` (the app's exception handler adds the header).

The address is the peer's, unless the peer is one of DOCKYARD_TRUSTED_PROXIES:
then the rightmost X-Forwarded-For entry that is not a trusted proxy
(functions/stream/auth.py `client_address`). uvicorn's own proxy-header
rewriting is off, so a client cannot pick its address by sending the header.
Behind queue-proxy and an ingress gateway, list them, or every client counts
as the gateway and the cap is global.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from functions.errors import BadInput

RETRY_AFTER_SECONDS = 5  # Retry-After of a 429 (too many streams from one address)


class TooManyStreams(BadInput):
    """More concurrent streams from one address than the cap: 429, retry later."""

    status = 429
    retry_after = RETRY_AFTER_SECONDS


class AddressCap:
    """Open streams per client address, at most `cap` each (0: no cap)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.open = Counter()

    def admit(self, address: str) -> Callable[[], None]:
        """Count a stream of `address`, or raise TooManyStreams; returns its release."""
        if self.cap and self.open[address] >= self.cap:
            raise TooManyStreams(
                f"{address} has {self.cap} streams open already, the most allowed; close one or retry later", "client"
            )
        self.open[address] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open[address] -= 1
            if self.open[address] <= 0:
                del self.open[address]

        return release
