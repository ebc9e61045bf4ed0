"""The layout's size rule (docs/DESIGN.md, "Layout"): no module in functions/ or agent/ is over 500 lines.

The import direction and the absence of import cycles are import-linter
contracts (pyproject.toml), checked by scripts/lint in CI.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    modules = [path for package in ("functions", "agent") for path in (ROOT / package).rglob("*.py")]
    assert len(modules) > 50  # the scan sees the packages
    too_long = {str(path.relative_to(ROOT)): n for path in modules if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert too_long == {}, "split these modules by concern"
