"""The CLI's last guard: every line it prints of what a server served is redacted again.

The stream already redacts everything it serves; this catches what a server
that knows fewer secrets (or an older one) lets through: secret formats always,
and the known values of `DOCKYARD_KNOWN_SECRETS_FILE` (a file or a directory of
Secret files) when this machine has it, with the stream's own `Redaction`.
"""

from __future__ import annotations

from functools import lru_cache

from agent.redact import Redactor


@lru_cache(maxsize=1)
def _redaction():
    from functions.core.settings import Settings
    from functions.stream.redaction import Redaction

    try:
        path = Settings.from_env().known_secrets_file or None
    except Exception:  # a bad unrelated setting must not stop `dockyard logs`: formats only
        path = None
    return Redaction(path)


def redactor() -> Redactor:
    return _redaction().current()


def clean(text: str) -> str:
    """`text` as it may be printed: secrets replaced by `agent.redact.REPLACEMENT`."""
    return redactor().redact(text)
