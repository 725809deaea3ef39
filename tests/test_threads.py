"""Thread-count control, bitwise determinism across thread counts, and
thread-safety of concurrent calls from several Python threads."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import convcore
from _helpers import randn


@pytest.fixture
def restore_threads():
    before = convcore.get_num_threads()
    yield before
    convcore.set_num_threads(before)


def test_get_num_threads_is_positive_int():
    n = convcore.get_num_threads()
    assert isinstance(n, int) and n >= 1


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_set_get_round_trip(restore_threads, n):
    convcore.set_num_threads(n)
    assert convcore.get_num_threads() == n


def test_set_num_threads_persists_across_calls(restore_threads):
    convcore.set_num_threads(2)
    x = np.ones((1, 2, 5, 5))
    convcore.conv2d(x, np.ones((2, 2, 3, 3)))
    assert convcore.get_num_threads() == 2
    convcore.set_num_threads(1)
    convcore.max_pool2d(x, 2)
    assert convcore.get_num_threads() == 1


def _workload(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = randn(rng, (4, 8, 17, 15), dtype)
    w = randn(rng, (12, 4, 3, 2), dtype)
    b = randn(rng, (12,), dtype)
    kw = dict(stride=(1, 2), padding=(1, 1), dilation=(2, 1), groups=2)
    gy = randn(rng, convcore.conv2d(x, w, b, **kw).shape, dtype)
    lx = randn(rng, (6, 300), dtype)
    lw = randn(rng, (40, 300), dtype)
    lgy = randn(rng, (6, 40), dtype)
    return x, w, b, kw, gy, lx, lw, lgy


def _run_all(x, w, b, kw, gy, lx, lw, lgy):
    """Returns (conv results, other results)."""
    conv = [convcore.conv2d(x, w, b, **kw)]
    conv += list(convcore.conv2d_backward(gy, x, w, **kw))
    other = [convcore.max_pool2d(x, 3, 2, 1, ceil_mode=True)]
    other.append(convcore.avg_pool2d(x, 3, 2, 1, ceil_mode=True,
                                     count_include_pad=False))
    other.append(convcore.adaptive_avg_pool2d(x, (5, 4)))
    other.append(convcore.linear(lx, lw))
    other += list(convcore.linear_backward(lgy, lx, lw))
    other.append(convcore.relu(x))
    return conv, other


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_results_match(ref_results, results, where):
    """Conv forward/backward must be bitwise identical (documented
    guarantee); the other ops must agree to within a few ulps (a different
    thread count may legitimately change a reduction order)."""
    (c0, o0), (c1, o1) = ref_results, results
    for i, (a, b) in enumerate(zip(c0, c1)):
        assert _same_bits(a, b), f"{where}: conv result {i} not bitwise equal"
    for i, (a, b) in enumerate(zip(o0, o1)):
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = 1e-5 if a.dtype == np.float32 else 1e-13
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol,
                                   err_msg=f"{where}: result {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_1_and_2_threads(restore_threads, dtype):
    data = _workload(dtype)
    convcore.set_num_threads(1)
    one = _run_all(*data)
    convcore.set_num_threads(2)
    two = _run_all(*data)
    convcore.set_num_threads(4)      # oversubscribed on small machines
    four = _run_all(*data)
    _assert_results_match(one, two, "1 vs 2 threads")
    _assert_results_match(one, four, "1 vs 4 threads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_calls_are_deterministic(dtype):
    data = _workload(dtype, seed=1)
    c0, o0 = _run_all(*data)
    for _ in range(3):
        c1, o1 = _run_all(*data)
        for a, b_ in zip(c0 + o0, c1 + o1):
            assert _same_bits(a, b_)


def test_concurrent_python_threads_match_sequential(restore_threads):
    convcore.set_num_threads(2)
    jobs = [_workload(np.float64 if i % 2 else np.float32, seed=i)
            for i in range(6)]
    sequential = [_run_all(*job) for job in jobs]
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()            # start all at once to maximise overlap
        return [_run_all(*jobs[i]) for _ in range(2)]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(worker, range(len(jobs))))
    # same thread count as the sequential run: everything bitwise equal
    for i, reps in enumerate(results):
        for rep in reps:
            seq = sequential[i][0] + sequential[i][1]
            for k, (a, b_) in enumerate(zip(seq, rep[0] + rep[1])):
                assert _same_bits(a, b_), (
                    f"job {i} result {k} differs when run concurrently")


def test_set_num_threads_while_other_threads_compute(restore_threads):
    """Changing the thread count from one Python thread while others are
    computing must not crash or change results."""
    data = _workload(np.float64, seed=7)
    convcore.set_num_threads(1)
    expected = _run_all(*data)
    stop = threading.Event()

    def toggler():
        n = 1
        while not stop.is_set():
            convcore.set_num_threads(n)
            n = 3 - n

    t = threading.Thread(target=toggler)
    t.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(lambda _: _run_all(*data), range(6)))
    finally:
        stop.set()
        t.join()
    for rep in results:
        _assert_results_match(expected, rep, "thread count changed mid-run")


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError),
                                     (1.5, TypeError), ("2", TypeError),
                                     (None, TypeError)])
def test_set_num_threads_rejects_bad_values(restore_threads, bad, exc):
    before = convcore.get_num_threads()
    with pytest.raises(exc):
        convcore.set_num_threads(bad)
    assert convcore.get_num_threads() == before
