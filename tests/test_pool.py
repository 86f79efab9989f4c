import os
import signal

import pytest

from unetpp_lib.core.pool import WorkerDied, map_cases


def square(x):
    return x * x


def die_on_three(item):
    if item["case"] == "liver_3":
        os.kill(os.getpid(), signal.SIGKILL)  # as the OS's out-of-memory killer does
    return item["case"]


def test_results_in_order_inline_and_pooled():
    assert map_cases(square, [3, 1, 2], 1) == [9, 1, 4]
    assert map_cases(square, list(range(7)), 2) == [i * i for i in range(7)]


@pytest.mark.slow
def test_killed_worker_is_named_never_silent():
    items = [{"case": f"liver_{i}"} for i in range(6)]
    with pytest.raises(WorkerDied, match=r"liver_3.*num_workers"):
        map_cases(die_on_three, items, 2)
