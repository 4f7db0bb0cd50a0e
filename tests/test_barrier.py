"""The barrier of one parallel region (kernels/barrier.py): every chunk sees what all wrote
before it, round after round; and a region whose chunks do not all run at once (more chunks
than threads) is refused by the rendezvous in every chunk, in bounded time, not hung."""
import time

import numpy as np
import pytest
from numba import njit, prange

from dllama_mpi import kernels as K
from dllama_mpi.kernels.barrier import _barrier, _rendezvous, barrier_state, reset_state
from test_kernels import threads  # noqa: F401  (the fixture)


@njit(parallel=True)
def _rounds(state, nch, sums, met):
    """Round r: chunk c writes (the sum of round r-1's row) + c, then all meet."""
    for c in prange(nch):
        met[c] = _rendezvous(state, nch)
        if met[c]:
            for r in range(sums.shape[0]):
                sums[r, c] = (sums[r - 1].sum() if r else 0) + c
                _barrier(state, nch)


@pytest.fixture
def keep_two_threads():
    old = K.get_num_threads()
    K.set_num_threads(min(2, K.max_threads()))
    yield
    K.set_num_threads(old)


def _want(rounds: int, nch: int) -> np.ndarray:
    want = np.zeros((rounds, nch), np.int64)
    for r in range(rounds):
        want[r] = (want[r - 1].sum() if r else 0) + np.arange(nch)
    return want


def test_every_round_sees_the_round_before(threads):  # noqa: F811
    nch = K.get_num_threads()
    state = barrier_state()
    for _ in range(3):                       # the same state again, reset
        reset_state(state)
        sums, met = np.zeros((2000, nch), np.int64), np.zeros(nch, np.bool_)
        _rounds(state, nch, sums, met)
        assert met.all()
        np.testing.assert_array_equal(sums, _want(2000, nch))


def test_more_chunks_than_threads_are_refused_not_hung(keep_two_threads):
    nch = K.get_num_threads() + 1           # a thread runs two chunks one after the other
    sums, met = np.zeros((5, nch), np.int64), np.ones(nch, np.bool_)
    t0 = time.perf_counter()
    _rounds(barrier_state(), nch, sums, met)
    assert not met.any()                    # every chunk was told, none ran its rounds
    assert not sums.any()
    assert time.perf_counter() - t0 < 30
