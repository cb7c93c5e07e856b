"""Every operation killed at each of its fault points, in the CLI or in a daemon, then recovered by a retry
and `neonctl start`: no orphan, no stuck branch, no untracked compute, no lost commit (issue 17). The
seeded randomised version is `python tests/crash_trials.py --trials 100`."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from crash_trials import CrashTrials, all_pairs


@pytest.fixture(scope="module")
def trials():
    t = CrashTrials(Path(os.environ["NEONCTL_HOME"]), project="crashes")
    t.setup()
    yield t
    t.teardown()


# A crash leaves errors in the logs by design: a peer that vanished, a stream cut midway.
@pytest.mark.daemon_errors(".")
def test_every_fault_point_of_every_operation(trials):
    rng = random.Random(1)
    outcomes = [trials.run(n, op, point, rng) for n, (op, point) in enumerate(all_pairs(), start=1)]
    not_reached = [(o.operation, o.point) for o in outcomes if not o.crashed]
    assert not not_reached, f"fault points never reached: {not_reached}"
    failed = [(o.operation, o.point, o.order, o.problems) for o in outcomes if o.problems]
    assert not failed, failed
    assert trials.check_ledger() == []
    assert {o.order for o in outcomes} == {"start,retry", "retry,start"}  # both recoveries were exercised
