"""Redaction of secrets before anything leaves the agent.

Two kinds of secrets are removed from text:

* known values: the exact contents of the files under the secrets directory
  (`contract.SECRETS_DIR`) and of an optional file of extra secrets, one per
  line. Values shorter than `MIN_KNOWN_LENGTH` characters are ignored: a short
  value such as ``"1"`` or ``"true"`` would wreck ordinary text.
* known formats (``patterns=True``): OpenAI keys (``sk-proj-...`` and the
  other prefixed kinds; a bare ``sk-`` with a random-looking body), Anthropic
  keys (``sk-ant-...``), GitHub tokens (``ghp_``, ``gho_``, ``ghu_``, ``ghs_``,
  ``ghr_``, ``github_pat_``), AWS access key ids (``AKIA``/``ASIA`` + 16), AWS
  secret access keys next to their name (``aws_secret_access_key = ...``,
  ``"SecretAccessKey": "..."``), bearer tokens, ``Authorization: Basic ...``,
  PEM and PGP private key blocks and the password of URLs with credentials,
  whatever it holds (``scheme://user:p/a@ss@host`` becomes
  ``scheme://user:[REDACTED]@host``). None is anchored at a word boundary: a
  key glued to other text (``token_sk-proj-...``, ``%3Dsk-...``, ``xAKIA...y``)
  is still found.

`Redactor.cut` redacts, then cuts: every text cut for a trace goes through it,
since a secret cut in half is no longer recognisable.

Both are single precompiled regular expressions (known values escaped and
sorted longest first, so a value that contains another is removed whole), and
each has a cheap prefilter so that text without any candidate is returned
untouched at C speed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

REPLACEMENT = "[REDACTED]"
MIN_KNOWN_LENGTH = 6

# Each alternative is a named group so that `_sub_pattern` knows what to keep.
# No `\b` anchors: a key glued to a word (`token_sk-proj-...`, `%3Dsk-proj-...`,
# `xAKIA...y`) is still a key. The repetitions are open-ended, so a match that
# starts early (inside text that happens to look like a prefix) runs on over the
# whole key instead of stopping inside it. Without anchors a pattern is tried at
# every position, so each part that may fail after a long scan is bounded or
# possessive: redaction stays linear in the text (tests/agent/test_redact.py
# times the worst inputs).
_PATTERNS = [
    # PEM and PGP private keys: the whole block, also when it is cut (no END line yet).
    r"(?P<pem>-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*\Z))",
    # Anthropic and the prefixed OpenAI keys: the prefix is distinctive enough.
    r"(?P<anthropic>sk-ant-[A-Za-z0-9_\-]{16,})",
    r"(?P<openai_pre>sk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{16,})",
    # Bare sk-: a random body (upper and lower case letters and a digit), so that
    # "task-abcdefghijklmnopqrstuvwxyz" or "disk-usage-monitor-2024" stay readable.
    r"(?P<openai>sk-(?=[A-Za-z0-9_\-]{0,200}[A-Z])(?=[A-Za-z0-9_\-]{0,200}[a-z])(?=[A-Za-z0-9_\-]{0,200}[0-9])[A-Za-z0-9_\-]{20,})",
    r"(?P<github>(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}))",
    r"(?P<aws>(?:AKIA|ASIA)[A-Z0-9]{16,})",
    # AWS secret access keys in context: aws_secret_access_key = x, "SecretAccessKey": "x",
    # AWS_SECRET_ACCESS_KEY=x, --secret-access-key x. Keep the name, drop the value.
    r"(?P<aws_secret_kw>(?i:secret[_\-]?access[_\-]?key)[\"']?(?:[ \t]*+[:=][ \t]*+|[ \t]++)[\"']?)(?P<aws_secret>[A-Za-z0-9/+=]{16,})",
    # "Authorization: Basic x" (also as JSON or a Python dict): keep the scheme.
    r"(?P<basic_kw>(?i:authorization)[\"']?[ \t]*+[:=][ \t]*+[\"']?(?i:basic)[ \t]++)(?P<basic>[A-Za-z0-9+/\-_]{4,}=*)",
    # "Authorization: Bearer x", "bearer x" (any case): keep the scheme word.
    r"(?P<bearer_kw>(?i:bearer)\s++)(?P<bearer>[A-Za-z0-9\-._~+/]{8,}=*)",
    # scheme://user:password@host: keep scheme and user, drop the password, whatever
    # it holds (`/`, `@`, `:`): everything up to the last `@` before a space or a quote
    # (at most 512 characters; a scheme of at most 32, a user of at most 256).
    r"(?P<url_head>[A-Za-z][A-Za-z0-9+.\-]{0,31}://[^\s:/@'\"<>]{0,256}:)(?P<url_pass>[^\s\"<>]{1,512})(?=@)",
]
_PATTERN_RE = re.compile("|".join(_PATTERNS), re.DOTALL)
_KEEP_HEAD = {"bearer": "bearer_kw", "url_pass": "url_head", "aws_secret": "aws_secret_kw", "basic": "basic_kw"}

# Literal fragments of which at least one occurs in any text a pattern matches;
# checked with `in` (C speed) before the regex runs.
_CANDIDATES = ("PRIVATE KEY", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "AKIA", "ASIA", "://")
_CANDIDATES_CI = ("bearer", "authorization", "secret")


def _sub_pattern(m: re.Match) -> str:
    head = _KEEP_HEAD.get(m.lastgroup)
    return m.group(head) + REPLACEMENT if head else REPLACEMENT


class Redactor:
    """Replaces secrets in text with `REPLACEMENT`. Thread-safe (immutable after init)."""

    def __init__(self, known_values: Iterable[str] = (), patterns: bool = True):
        values = set()
        for value in known_values:
            if not isinstance(value, str):
                continue
            value = value.strip()
            if len(value) >= MIN_KNOWN_LENGTH:
                values.add(value)
        # Longest first, so the longest secret wins where one contains another.
        self._values = tuple(sorted(values, key=lambda v: (-len(v), v)))
        self._known_re = re.compile("|".join(re.escape(v) for v in self._values)) if self._values else None
        self.patterns = patterns

    @property
    def known_count(self) -> int:
        return len(self._values)

    @classmethod
    def from_secrets_dir(cls, path: str | os.PathLike | None, extra_file: str | os.PathLike | None = None,
                         patterns: bool = True) -> "Redactor":
        """Known values from every regular file under `path` (recursively) and `extra_file` (one per line).

        A directory that does not exist, unreadable files and binary junk are skipped:
        redaction must never be the reason an agent fails to start.
        """
        values: list[str] = []
        if path is not None:
            root = Path(path)
            if root.is_dir():
                for dirpath, _dirnames, filenames in os.walk(root, onerror=lambda e: None):
                    # Kubernetes secret volumes hold ..data symlinks and timestamped dirs;
                    # walking them is harmless (duplicates collapse in a set).
                    for name in filenames:
                        value = _read_text(Path(dirpath) / name)
                        if value is not None:
                            values.append(value.strip())
            elif root.is_file():
                value = _read_text(root)
                if value is not None:
                    values.append(value.strip())
        if extra_file is not None:
            value = _read_text(Path(extra_file))
            if value is not None:
                values.extend(line.strip() for line in value.splitlines())
        return cls(values, patterns=patterns)

    def redact(self, text: str) -> str:
        if not text or not isinstance(text, str):
            return text
        if self._known_re is not None:
            for value in self._values:
                if value in text:
                    text = self._known_re.sub(REPLACEMENT, text)
                    break
        if self.patterns:
            for cand in _CANDIDATES:
                if cand in text:
                    return _PATTERN_RE.sub(_sub_pattern, text)
            lowered = text.lower()
            for cand in _CANDIDATES_CI:
                if cand in lowered:
                    return _PATTERN_RE.sub(_sub_pattern, text)
        return text

    def cut(self, text: str, limit: int) -> str:
        """`text` redacted, then cut to `limit` characters with a note of how many were left out.

        In this order: a secret cut in half is no longer recognisable, so a cut
        before redaction would publish its first characters.
        """
        text = self.redact(text)
        if len(text) > limit:
            return text[:limit] + f"... [{len(text) - limit} more chars]"
        return text

    def redact_obj(self, obj: Any) -> Any:
        """A copy of `obj` with every string (values, and keys of dicts) redacted; other leaves as they are."""
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, dict):
            return {(self.redact(k) if isinstance(k, str) else k): self.redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.redact_obj(v) for v in obj]
        if isinstance(obj, (set, frozenset)):
            return [self.redact_obj(v) for v in obj]
        if isinstance(obj, bytes):
            try:
                return self.redact(obj.decode("utf-8"))
            except UnicodeDecodeError:
                return obj
        return obj


def _read_text(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
