"""The parity summary line counts a test whose setup failed (e.g. no reference venv) as failed, once."""
from types import SimpleNamespace

from conftest import parity_outcomes


def _report(node: str, when: str, parity: bool = True) -> SimpleNamespace:
    return SimpleNamespace(nodeid=node, when=when, keywords={"parity": 1} if parity else {})


def test_setup_errors_count_as_failures_and_each_test_once():
    stats = {
        "passed": [_report("a", "setup"), _report("a", "call"), _report("a", "teardown"),  # a: passed
                   _report("c", "setup"), _report("d", "call", parity=False)],
        "error": [_report("b", "setup"), _report("c", "teardown")],  # b: the venv could not be built; c: teardown
        "failed": [_report("e", "call")],
        "skipped": [_report("f", "setup")],
    }
    assert parity_outcomes(stats) == {"passed": 1, "failed": 3, "skipped": 1}


def test_a_suite_whose_setup_fails_everywhere_shows_no_passes():
    stats = {"error": [_report(f"t{i}", "setup") for i in range(28)], "passed": [_report("x", "setup")]}
    assert parity_outcomes(stats) == {"passed": 0, "failed": 28, "skipped": 0}
