"""The README's configuration lists every variable the agent's processes read.

The orchestrator's table is generated from its settings model and checked in
tests/functions/core/test_settings.py; the agent's processes take flags with
environment fallbacks, read here from their parsers' help and the source.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent import restore, run, snapshotter

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"DOCKYARD_[A-Z0-9_]+")


def _agent_table() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**The agent's processes**") :]
    return section[: section.index("\n\n", section.index("| variable |"))]


def _variables_read_by_the_agent() -> set[str]:
    found: set[str] = set()
    for parser in (run.build_parser(), snapshotter._parser(), restore._parser()):
        found |= set(VARIABLE.findall(parser.format_help().replace("\n", " ").replace("DOCKYARD_ ", "DOCKYARD_")))
    for path in (ROOT / "agent").rglob("*.py"):
        source = path.read_text()
        found |= set(VARIABLE.findall(source))
        found |= {f"DOCKYARD_{name}" for name in re.findall(r'env_default\("([A-Z0-9_]+)"', source)}
        found |= {f"DOCKYARD_{name}" for name in re.findall(r"ENV_PREFIX\}([A-Z0-9_]+)", source)}
    return found


def test_every_variable_the_agent_reads_is_in_the_readme_table():
    table = _agent_table()
    listed = set(VARIABLE.findall(table))
    read = _variables_read_by_the_agent()
    assert {"DOCKYARD_TASK_ID", "DOCKYARD_NATS_URL", "DOCKYARD_SNAPSHOT_KEEP"} <= read  # the scan sees them
    assert sorted(read - listed) == [], "add these to the README's agent table"
    assert sorted(listed - read) == [], "the README's agent table lists variables the agent no longer reads"


def test_kn_event_send_targets_use_the_kn_sink_format():
    """Issue 11, defect 3: since kn-plugin-event 1.16, `--to` takes kn's sink format (`broker:NAME`,
    `ksvc:NAME`, `channel:NAME`, `svc:NAME:NS`, a URL); `Broker:eventing.knative.dev/v1:default` fails."""
    docs = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    targets = [m for text in docs for m in re.findall(r"kn event send[^`]*?--to[ =](\S+)", text, flags=re.S)]
    assert targets, "the docs show no `kn event send --to`"
    sink = re.compile(r"(broker|channel|ksvc|svc):[a-z0-9-]+(:[a-z0-9-]+)?|https?://\S+")
    assert [t for t in targets if not sink.fullmatch(t)] == []
