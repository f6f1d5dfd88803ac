"""The test suite's own rules, checked on its source: shared helpers come from helpers.py, never from
conftest.py (pytest imports conftest itself; importing it again makes a second copy of its module);
the project's own packages are imported plainly, never skipped with ``importorskip`` (a broken import
must fail, not vanish from the run); ``slow`` is a registered marker."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
PROJECT_PACKAGES = ("clbench", "methods", "strategies")
CONFTEST_IMPORT = re.compile(r"^\s*(from\s+(tests\.)?conftest\s+import|import\s+(tests\.)?conftest\b)", re.MULTILINE)
IMPORTORSKIP = re.compile(r"importorskip\(\s*['\"]([\w.]+)['\"]")


def sources() -> dict[str, str]:
    """Every test module's text but this one's (its examples below break the rules on purpose)."""
    return {path.name: path.read_text() for path in sorted(TESTS.glob("*.py")) if path.name != Path(__file__).name}


def test_no_test_imports_from_conftest() -> None:
    offenders = [name for name, text in sources().items() if CONFTEST_IMPORT.search(text)]
    assert offenders == [], f"import shared helpers from helpers.py, not conftest: {offenders}"


def test_importorskip_only_for_optional_packages() -> None:
    skipped = {(name, module) for name, text in sources().items() for module in IMPORTORSKIP.findall(text)}
    own = sorted((name, module) for name, module in skipped if module.split(".")[0] in PROJECT_PACKAGES)
    assert own == [], f"import the project's own modules plainly: {own}"


def test_the_rules_above_can_fail() -> None:
    assert CONFTEST_IMPORT.search("x = 1\n    from conftest import engine_run\n")
    assert CONFTEST_IMPORT.search("from tests.conftest import STRATEGY_CASES")
    assert not CONFTEST_IMPORT.search("from helpers import write_category  # not conftest")
    assert IMPORTORSKIP.findall('data = pytest.importorskip("clbench.data")') == ["clbench.data"]


def test_slow_marker_is_registered(pytestconfig: pytest.Config) -> None:
    assert any(marker.startswith("slow:") for marker in pytestconfig.getini("markers"))
