"""Test tiers: every test belongs to one, by a marker on its file (``pytestmark``) or on the test itself.

- ``fast``: the fast tier, the README's test command (``bash tools/test.sh``): a real check of everything in minutes.
- ``slow("why")``: only in the full tier (``bash tools/test.sh --full``, what CI runs). The reason says why the test
  is left out of the fast tier (what makes it slow, or that a fast test already covers its kind).

The full tier is every test. The marker closest to the test wins (a ``fast`` case in a ``slow`` file is fast).
``--tier fast|slow|full`` selects a tier; a test without a tier, or a ``slow`` marker without a reason, stops the
collection with an error naming the tests. Imported by ``conftest.py``; pytest-free helpers stay testable alone.
"""
from __future__ import annotations

import pytest
from _pytest.mark.structures import ParameterSet

TIERS = ("fast", "slow")
CHOICES = ("fast", "slow", "full")  # full = fast + slow


def tier_of(item: pytest.Item) -> str | None:
    """The tier of a collected test: its closest ``fast`` or ``slow`` marker, or None."""
    for marker in item.iter_markers():
        if marker.name in TIERS:
            return marker.name
    return None


def slow_reason(item: pytest.Item) -> str:
    marker = item.get_closest_marker("slow")
    return str(marker.args[0]).strip() if marker and marker.args else ""


def problems(items: list[pytest.Item]) -> list[str]:
    """What the guard refuses, one line per test: no tier, or a slow marker that gives no reason."""
    found = []
    for item in items:
        tier = tier_of(item)
        if tier is None:
            found.append(f"{item.nodeid}: no tier (mark it, or its file, fast or slow(\"why\"))")
        elif tier == "slow" and not slow_reason(item):
            found.append(f"{item.nodeid}: slow without a reason (slow(\"why it is left out of the fast tier\"))")
    return found


def fast_cases(cases: list, *fast: object) -> list:
    """``cases`` for a parametrize, the ones equal to one of ``fast`` marked fast (the others keep the tier of their
    test or file). A case is a value, a tuple of values, or a ``pytest.param`` (compared by its values)."""
    out = []
    for case in cases:
        if isinstance(case, ParameterSet):
            values, marks, id_ = case.values, case.marks, case.id
        else:
            values, marks, id_ = (case if isinstance(case, tuple) else (case,)), (), None
        if any(values == (f if isinstance(f, tuple) else (f,)) for f in fast):
            case = pytest.param(*values, marks=(*marks, pytest.mark.fast), id=id_)
        out.append(case)
    unknown = [f for f in fast if not any((c.values if isinstance(c, ParameterSet) else c) ==
                                          (f if isinstance(f, tuple) else (f,)) for c in out)]
    if unknown:
        raise ValueError(f"fast_cases: {unknown} are not among the cases")
    return out


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tier", choices=CHOICES, default="full",
                     help="fast: the fast tier; slow: the full tier's tests that are not in the fast tier; "
                          "full: every test (default)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: in the fast tier (bash tools/test.sh) and the full tier")
    config.addinivalue_line("markers", "slow(reason): only in the full tier (bash tools/test.sh --full); says why")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    found = problems(items)
    if found:
        raise pytest.UsageError("tests without a proper tier (tests/tiers.py):\n  " + "\n  ".join(found))
    wanted = config.getoption("--tier")
    if wanted == "full":
        return
    keep = [item for item in items if tier_of(item) == wanted]
    dropped = [item for item in items if tier_of(item) != wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
