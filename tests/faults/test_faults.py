"""The fault suite (suite.py) as tests: one per case, the real program in a subprocess.

    python -m pytest tests/faults            # every case (~1-2 min on an idle 2-core machine)
    python tests/faults/table.py             # the same cases, as the README's table
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import suite  # noqa: E402

CASES = suite.cases()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults"))
    return root, suite.build_fixtures(root)


def test_at_least_40_cases_with_unique_ids():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    assert len([c for c in CASES if not c.skip]) >= 40


@pytest.mark.timeout(suite.TIMEOUT + 60)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(fixtures, case):
    root, fx = fixtures
    r = suite.run_case(case, fx, root)
    if r.skipped:
        pytest.skip(r.skipped)
    assert not r.problems, (f"{case.id}: {'; '.join(r.problems)}\n--- stderr:\n{r.stderr[-3000:]}"
                            f"\n--- stdout:\n{r.stdout[-1000:]}")
