"""Property: every secret format, placed anywhere in random text, glued or not, and across the
2,000-character cut of a trace event, leaves no trace of itself (issue 9, finding 6).

"No trace" is checked window by window: no 8 consecutive characters of the secret
appear in the output more often than they appear in the random text around it
(a cut that kept 20 of 25 characters fails this).
"""

from __future__ import annotations

import string
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.graph import _truncate
from agent.redact import Redactor

WINDOW = 8
CUT = 2000
ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"


def _body(alphabet: str, size: int, must: str = "") -> st.SearchStrategy[str]:
    """`size` characters of `alphabet`, with the characters of `must` mixed in (a random key has them)."""
    return st.text(alphabet, min_size=size, max_size=size).flatmap(
        lambda body: st.permutations(list(body[: size - len(must)] + must)).map("".join)
    )


def _framed(head: str, body: st.SearchStrategy[str], tail: str = "") -> st.SearchStrategy[tuple[str, str]]:
    """(text as it is written, the secret in it)."""
    return body.map(lambda b: (f"{head}{b}{tail}", b))


KNOWN = "known-secret-Value_25char"  # 25 characters, given to the Redactor as a known value

FORMATS = {
    "openai-proj": _framed("sk-proj-", _body(ALNUM + "_-", 40, "aZ1")).map(lambda p: (p[0], p[0])),
    "openai-bare": _framed("sk-", _body(ALNUM, 48, "aZ1")).map(lambda p: (p[0], p[0])),
    "anthropic": _framed("sk-ant-api03-", _body(ALNUM + "_-", 40)).map(lambda p: (p[0], p[0])),
    "github": _framed("ghp_", _body(ALNUM, 36)).map(lambda p: (p[0], p[0])),
    "github-pat": _framed("github_pat_", _body(ALNUM + "_", 82)).map(lambda p: (p[0], p[0])),
    "aws-key-id": _framed("AKIA", _body(string.ascii_uppercase + string.digits, 16)).map(lambda p: (p[0], p[0])),
    "aws-secret-ini": _framed("aws_secret_access_key = ", _body(B64, 40)),
    "aws-secret-json": _framed('"SecretAccessKey": "', _body(B64, 40), '"'),
    "basic": _framed("Authorization: Basic ", _body(B64, 24), "=="),
    "bearer": _framed("Authorization: Bearer ", _body(ALNUM + "-._~+/", 40)),
    "pem": _framed("-----BEGIN RSA PRIVATE KEY-----\n", _body(B64, 64), "\n-----END RSA PRIVATE KEY-----"),
    "pgp": _framed("-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n", _body(B64, 64), "\n=Ab12\n-----END PGP PRIVATE KEY BLOCK-----"),
    # Any characters a URL password may hold unencoded, `/`, `@` and `:` included.
    "url-password": _framed("https://bob:", _body(ALNUM + "/@:!$&'()*+,;=%-._~", 20, "/@:"), "@git.example.com/r.git"),
    "known-value": st.just((KNOWN, KNOWN)),
}

# Random text around the secret: anything, including letters glued to it, quotes, newlines and URL escapes.
AROUND = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60) | st.text(ALNUM + "_%=:/ \n\"'", max_size=60)


def _leaked(secret: str, around: str, out: str) -> list[str]:
    windows = {secret[i : i + WINDOW] for i in range(max(1, len(secret) - WINDOW + 1))}
    return sorted(w for w in windows if out.count(w) > around.count(w))


def _check(format_: tuple[str, str], before: str, after: str, redact) -> None:
    written, secret = format_
    out = redact(before + written + after)
    leaked = _leaked(secret, f"{before}\0{after}", out)
    assert not leaked, f"{leaked} survived in {out!r}"


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _test_for(name: str):
    @FAST
    @given(format_=FORMATS[name], before=AROUND, after=AROUND)
    def anywhere_in_random_text(format_, before, after):
        _check(format_, before, after, Redactor([KNOWN]).redact)

    @FAST
    @given(format_=FORMATS[name], before=AROUND, after=AROUND, back=st.integers(0, 120))
    def across_the_cut(format_, before, after, back):
        # The secret starts `back` characters before the cut, whatever its length: cut anywhere in it, or just after.
        pad = "p" * max(0, CUT - len(before) - back)
        deps = SimpleNamespace(reporter=SimpleNamespace(redactor=Redactor([KNOWN])))
        _check(format_, pad + before, after, lambda text: _truncate(deps, text, CUT))

    return anywhere_in_random_text, across_the_cut


for _name in FORMATS:
    _anywhere, _across = _test_for(_name)
    globals()[f"test_{_name.replace('-', '_')}_anywhere_in_random_text"] = _anywhere
    globals()[f"test_{_name.replace('-', '_')}_across_the_2000_character_cut"] = _across
