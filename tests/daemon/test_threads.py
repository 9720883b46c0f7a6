"""The score process keeps numpy's BLAS to one thread beside ONNX Runtime (no broker needed)."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info

from streamfilter.daemon import _blas_threads


def _blas_thread_counts() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_is_held_to_one_thread_while_the_score_stage_runs_and_restored_after():
    np.dot(np.ones((4, 4)), np.ones((4, 4)))  # numpy's BLAS is loaded
    before = _blas_thread_counts()
    assert before, "numpy has no BLAS that threadpoolctl sees"
    with _blas_threads(1):
        assert _blas_thread_counts() == [1] * len(before)
    assert _blas_thread_counts() == before
    with _blas_threads(None):  # no score stage in the process: left as it is
        assert _blas_thread_counts() == before
