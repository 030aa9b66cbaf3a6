"""The tier guard (tests/tiers.py) in a throw-away pytest run: a test without a tier, or slow without a reason, stops
the collection naming it; --tier selects the fast tier, the rest, or everything; the closest marker wins."""
from __future__ import annotations

import pytest

from tests import tiers

pytestmark = pytest.mark.fast

CONFTEST = f"""
import sys
sys.path.insert(0, {str(tiers.__file__.rsplit('/', 2)[0])!r})
from tests.tiers import pytest_addoption, pytest_collection_modifyitems, pytest_configure
"""

TIERED = """
import pytest
pytestmark = pytest.mark.slow("a whole file of slow cases")

def test_slow_by_file():
    pass

@pytest.mark.fast
def test_fast_in_a_slow_file():
    pass

@pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.fast)])
def test_one_case_fast(n):
    pass
"""


@pytest.fixture
def run(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)

    def run(source: str, *args: str) -> pytest.RunResult:
        pytester.makepyfile(test_case=source)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)

    return run


def test_a_test_without_a_tier_stops_the_collection_naming_it(run):
    result = run("def test_untiered():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_case.py::test_untiered: no tier*"])


def test_slow_without_a_reason_is_refused(run):
    result = run("import pytest\n\n@pytest.mark.slow\ndef test_lazy():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_case.py::test_lazy: slow without a reason*"])


@pytest.mark.parametrize("tier, selected", [
    ("fast", ["test_fast_in_a_slow_file", "test_one_case_fast[2]"]),
    ("slow", ["test_slow_by_file", "test_one_case_fast[1]"]),
    ("full", ["test_slow_by_file", "test_fast_in_a_slow_file", "test_one_case_fast[1]", "test_one_case_fast[2]"]),
])
def test_tier_selects_its_tests(run, tier, selected):
    result = run(TIERED, "--tier", tier, "-v")
    assert result.ret == pytest.ExitCode.OK
    passed = sorted(line.split("::")[1].split(" ")[0] for line in result.outlines if " PASSED" in line)
    assert passed == sorted(selected)
