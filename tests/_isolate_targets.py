"""Worker targets for tests/test_pixel_budget.py (imported by spawned worker processes)."""

import os
import time

import numpy as np


class FakePanic(BaseException):
    """Stands in for pyo3's PanicException."""


def work(i: int) -> int:
    if i == 2:
        raise FakePanic(f"boom {i}")
    if i == 3:
        os._exit(7)
    if i == 6:
        time.sleep(60)
    return i * 10


def allocate(n: int) -> int:
    return int(np.ones(n, np.uint8).sum())
