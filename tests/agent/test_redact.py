"""Redaction of known secret values and known secret formats."""

from __future__ import annotations

import os

import pytest

from agent.redact import REPLACEMENT, Redactor

R = REPLACEMENT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("key sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2" + " end", f"key {R} end"),
        ("OPENAI_API_KEY=sk-proj-" + "Ab3_-" * 10, f"OPENAI_API_KEY={R}"),
        ("x-api-key: sk-ant-api03-" + "Zz9-" * 12 + "AA", f"x-api-key: {R}"),
        ("token ghp_" + "a" * 36 + " ok", f"token {R} ok"),
        ("gho_" + "B" * 36, R),
        ("ghu_" + "c1" * 18 + ",ghs_" + "d2" * 18 + ";ghr_" + "e3" * 18, f"{R},{R};{R}"),
        ("GH_TOKEN=github_pat_11ABCDEFG0" + "x" * 70, f"GH_TOKEN={R}"),
        ("aws AKIAIOSFODNN7EXAMPLE id", f"aws {R} id"),
        ("session ASIAY34FZKBOKMUTVV7A.", f"session {R}."),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_", f"Authorization: Bearer {R}"),
        ("curl -H 'authorization: bearer abcdefgh12345678'", f"curl -H 'authorization: bearer {R}'"),
        ("BEARER  Zm9vYmFyYmF6cXV4==", f"BEARER  {R}"),
        (
            "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\ndone",
            f"key:\n{R}\ndone",
        ),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", R),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg (cut off", R),
        ("git clone https://bob:hunter2secret@github.com/o/r.git", f"git clone https://bob:{R}@github.com/o/r.git"),
        ("postgres://:pw-only@db:5432/x and redis://u:p%40ss@cache/0", f"postgres://:{R}@db:5432/x and redis://u:{R}@cache/0"),
        ("https://user:p@ss@host/path", f"https://user:{R}@host/path"),
        # issue 9, finding 6: glued to a word, PGP blocks, AWS secret keys in context, Basic, any URL password
        ("token_sk-proj-" + "Ab3_-" * 6, f"token_{R}"),
        ("https://x.example/cb?k%3Dsk-proj-" + "Zq9y" * 6, f"https://x.example/cb?k%3D{R}"),
        ("xAKIAIOSFODNN7EXAMPLEy", f"x{R}y"),
        ("id=ghp_" + "a1" * 18 + "_tail", f"id={R}_tail"),
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF\n=ab12\n-----END PGP PRIVATE KEY BLOCK-----\nok", f"{R}\nok"),
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBFcut", R),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", f"aws_secret_access_key = {R}"),
        ('{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', f'{{"SecretAccessKey": "{R}"}}'),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", f"AWS_SECRET_ACCESS_KEY={R}"),
        ("--secret-access-key wJalrXUtnFEMI/K7MDENG+bPxRfiCY", f"--secret-access-key {R}"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", f"Authorization: Basic {R}"),
        ('headers={"authorization": "basic dXNlcjpwYXNz"}', f'headers={{"authorization": "basic {R}"}}'),
        ("https://bob:pa/ss:w@rd@host/r.git", f"https://bob:{R}@host/r.git"),
        ("ftp://u:a/b/c@files.example", f"ftp://u:{R}@files.example"),
    ],
)
def test_patterns(text, expected):
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "plain log line: wrote 3 files in 0.2s",
        "the task-abcdefghijklmnopqrstuvwxyz0123 went through high load",
        "see http://localhost:8080/path and https://example.com/a@b",
        "ghp_short and sk-short",
        "AKIA is a prefix, AKIAshort too",
        "bearer token is missing: bearer",
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
        "user@example.com wrote to git@github.com:o/r.git",
        "the disk-usage-monitor-service-2024 and task-abcdefghijklmnopqrstuvwxyz0123 are fine",
        "a basic setup; the secret is to wait; authorization failed",
        "https://example.com:8443/path/to/x and more",
    ],
)
def test_ordinary_text_is_untouched(text):
    assert Redactor().redact(text) == text


def test_patterns_can_be_switched_off():
    text = "ghp_" + "a" * 36 + " and my-known-secret"
    assert Redactor(["my-known-secret"], patterns=False).redact(text) == "ghp_" + "a" * 36 + f" and {R}"


def test_known_values_longest_first_and_short_ignored():
    r = Redactor(["abc", "hunter2-long", "hunter2-long-and-longer", "  spaced-secret\n", "", None])
    assert r.known_count == 3
    assert r.redact("abc hunter2-long-and-longer hunter2-long spaced-secret") == f"abc {R} {R} {R}"
    assert r.redact("a.b*c (regex chars)") == "a.b*c (regex chars)"


def test_known_values_with_regex_characters():
    r = Redactor(["p@ss.w*rd(1)", "x+y?z[0]"])
    assert r.redact("login p@ss.w*rd(1) then x+y?z[0] but not pXss.wwrd(1)") == f"login {R} then {R} but not pXss.wwrd(1)"


def test_redact_obj_recurses_and_copies():
    r = Redactor(["topsecret-1"])
    obj = {"a": "topsecret-1", "b": ["x", {"c": "ghp_" + "z" * 36}], "n": 3, "t": ("topsecret-1",), "none": None,
           "topsecret-1": True}
    out = r.redact_obj(obj)
    assert out == {"a": R, "b": ["x", {"c": R}], "n": 3, "t": [R], "none": None, R: True}
    assert obj["a"] == "topsecret-1"  # the input is not modified


def test_from_secrets_dir(tmp_path):
    secrets = tmp_path / "secrets"
    (secrets / "model").mkdir(parents=True)
    (secrets / "model" / "api-key").write_text("model-key-123456\n")
    (secrets / "s3").mkdir()
    (secrets / "s3" / "AWS_SECRET_ACCESS_KEY").write_text("wJalrXUtnFEMI/K7MDENG\n")
    (secrets / "short").write_text("ab")
    (secrets / "binary").write_bytes(b"\xff\xfe\x00\x01")
    unreadable = secrets / "unreadable"
    unreadable.write_text("cannot-read-me-123")
    os.chmod(unreadable, 0)
    extra = tmp_path / "extra.txt"
    extra.write_text("extra-one-secret\n\nextra-two-secret\nxy\n")

    r = Redactor.from_secrets_dir(secrets, extra_file=extra)
    text = "model-key-123456 wJalrXUtnFEMI/K7MDENG extra-one-secret extra-two-secret ab xy"
    assert r.redact(text) == f"{R} {R} {R} {R} ab xy"


def test_from_secrets_dir_missing_paths():
    r = Redactor.from_secrets_dir("/nonexistent/secrets", extra_file="/nonexistent/extra")
    assert r.known_count == 0
    assert r.redact("nothing here") == "nothing here"
    assert Redactor.from_secrets_dir(None).known_count == 0


def test_kubernetes_secret_volume_layout(tmp_path):
    """Secret volumes are symlinks into a timestamped ..data directory."""
    data = tmp_path / "..2024_01_01_00_00_00.123"
    data.mkdir()
    (data / "token").write_text("k8s-token-value-xyz")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "token").symlink_to("..data/token")
    assert Redactor.from_secrets_dir(tmp_path).redact("k8s-token-value-xyz") == R


def test_cut_redacts_first():
    """A secret across the cut: cutting first left its head, which no pattern or known value recognises."""
    known = "Kn0wn-secret-value-25chrs"
    r = Redactor([known])
    text = "x" * 1980 + known + " tail"
    assert known[:20] not in r.cut(text, 2000)
    assert r.cut(text, 2000).startswith("x" * 1980 + R)
    assert r.cut("short " + known, 2000) == f"short {R}"
    assert r.cut("y" * 2001, 2000) == "y" * 2000 + "... [1 more chars]"


N = 64 * 1024  # the longest string a trace record keeps (agent.telemetry.records.MAX_STRING)


@pytest.mark.parametrize(
    "text",
    [
        "a://b:" * (N // 6),
        "http://u:" + "x" * N,
        "a" * N + "://",
        "sk-" * (N // 3),
        "sk-" + "a" * N,
        "secret_access_key" + " " * N,
        "secret_access_key:" * (N // 18),
        "authorization:" + " " * N,
        "bearer " * (N // 7),
        "-----BEGIN RSA PRIVATE KEY-----" * (N // 31),
        "AKIA" * (N // 4) + "ghp_" * (N // 4),
    ],
    ids=lambda t: repr(t[:20]),
)
def test_redaction_stays_linear_on_hostile_text(text):
    """Unanchored patterns are tried at every position; the worst of these took 3.7-57 s before their scans were bounded."""
    import time

    started = time.perf_counter()
    Redactor(["known-value-123456"]).redact(text)
    assert time.perf_counter() - started < 1.0
