"""Data-parallel training: 2-rank MPI jobs (tests/distributed_job.py under
mpiexec, one thread per rank) and the single-process checkpoint/resume."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import convcore as cc
from convcore.data import DataLoader, load_digits
from convcore.models import lenet5
from convcore.nn import CrossEntropyLoss, init
from convcore.optim import SGD, ReduceLROnPlateau
from convcore.train import fit
from _helpers import convcore_env

JOB = os.path.join(os.path.dirname(__file__), "distributed_job.py")


def _mpiexec():
    if importlib.util.find_spec("mpi4py") is None:
        return None
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason='needs mpi4py and mpiexec: '
                               'pip install "convcore[distributed]"')


def _job(scenario, tmp_path, timeout=120, extra=(), job_timeout=60):
    env = convcore_env()
    env["OMP_NUM_THREADS"] = "1"
    env["CC_TIMEOUT"] = str(job_timeout)
    proc = subprocess.run([MPIEXEC, *extra, "-n", "2", sys.executable, JOB, scenario,
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    results = {}
    for r in (0, 1):
        path = tmp_path / f"rank{r}.json"
        if path.exists():
            results[r] = json.loads(path.read_text())
    return proc, results


@needs_mpi
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    proc, res = _job("equivalence", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = res[0], res[1]
    # every rank ends with bit-identical parameters and the same global figures
    assert r0["digest"] == r1["digest"]
    assert r0["val_acc"] == r1["val_acc"] and r0["train_loss"] == r1["train_loss"]
    # 2 ranks x batch 8 == 1 process x batch 16, to float32 precision, after 2 epochs
    # of 19 steps (the last one short) with momentum and weight decay
    assert r0["worst_rel_param"] < 1e-5
    assert r0["val_acc"] == r0["single_val_acc"]
    np.testing.assert_allclose(r0["train_loss"], r0["single_train_loss"], rtol=1e-6)


@needs_mpi
def test_model_mismatch_fails_clearly_on_every_rank(tmp_path):
    proc, res = _job("mismatch", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert "differs across ranks" in res[r]["error"]
        assert "(10, 84)" in res[r]["error"] and "(9, 84)" in res[r]["error"]


@needs_mpi
def test_a_rank_that_dies_ends_the_job(tmp_path):
    # mpiexec ends the other rank at once and fails
    proc, _ = _job("dies", tmp_path, timeout=60)
    assert proc.returncode != 0


@needs_mpi
def test_without_the_launchers_cleanup_the_survivor_times_out_clearly(tmp_path):
    proc, res = _job("dies", tmp_path, timeout=60, extra=["-disable-auto-cleanup"],
                     job_timeout=3)
    assert proc.returncode != 0
    assert "did not complete within 3 s" in res[0]["error"]


@needs_mpi
def test_a_rank_that_leaves_quietly_does_not_hang_the_job(tmp_path):
    proc, res = _job("leaves", tmp_path, timeout=60, job_timeout=3)
    assert proc.returncode != 0
    assert "another rank has died, stalled or left the job" in res[0]["error"]
    assert "ending the job" in proc.stderr


@needs_mpi
def test_checkpoint_resume_across_ranks(tmp_path):
    proc, res = _job("resume", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert res[r]["resumed_equal"] and res[r]["history_equal"]
        assert res[r]["epochs"] == [1, 2, 3]


# ------------------------------------------------------------- single process

def _setup(seed=0):
    x, y = load_digits(size=28, padding=2)
    x, y = x[:200], y[:200]
    init.manual_seed(seed)
    model = lenet5(num_classes=10, input_size=(1, 32, 32))
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = ReduceLROnPlateau(opt, mode="max", patience=0)
    train = DataLoader(x, y, batch_size=32, shuffle=True, seed=seed)
    val = DataLoader(x[:64], y[:64], batch_size=64)
    return model, opt, sched, train, val


def test_resume_continues_exactly_where_a_run_stopped(tmp_path, one_core_thread):
    ckpt = tmp_path / "run.safetensors"
    model, opt, sched, train, val = _setup()
    fit(model, CrossEntropyLoss(), opt, train, val, epochs=2, scheduler=sched,
        early_stopping=5, progress=False, checkpoint=ckpt)
    model, opt, sched, train, val = _setup()
    lines = []
    resumed = fit(model, CrossEntropyLoss(), opt, train, val, epochs=4, scheduler=sched,
                  early_stopping=5, print_fn=lines.append, checkpoint=ckpt, resume=True)
    assert lines[0] == f"resumed from {ckpt} after epoch 2"
    straight_model, opt2, sched2, train2, val2 = _setup()
    straight = fit(straight_model, CrossEntropyLoss(), opt2, train2, val2, epochs=4,
                   scheduler=sched2, early_stopping=5, progress=False)
    assert resumed.epoch == straight.epoch == [1, 2, 3, 4]
    assert resumed.train_loss == straight.train_loss
    assert resumed.lr == straight.lr and resumed.best_epoch == straight.best_epoch
    for a, b in zip(model.state_dict().values(), straight_model.state_dict().values()):
        np.testing.assert_array_equal(a, b)


def test_resume_without_a_file_starts_afresh(tmp_path, one_core_thread):
    model, opt, sched, train, val = _setup()
    hist = fit(model, CrossEntropyLoss(), opt, train, epochs=1, progress=False,
               checkpoint=tmp_path / "new.safetensors", resume=True)
    assert hist.epoch == [1] and (tmp_path / "new.safetensors").exists()


def test_fit_argument_errors(tmp_path):
    model, opt, sched, train, val = _setup()
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        fit(model, CrossEntropyLoss(), opt, train, resume=True)
    with pytest.raises(TypeError, match="distributed must be a convcore.distributed"):
        fit(model, CrossEntropyLoss(), opt, train, distributed="mpi")
    with pytest.raises(TypeError, match="checkpoint must be a str"):
        fit(model, CrossEntropyLoss(), opt, train, checkpoint=3)
    cc.save(model, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a checkpoint"):
        fit(model, CrossEntropyLoss(), opt, train, checkpoint=tmp_path / "model.safetensors",
            resume=True)


# ------------------------------------------------------------- the GPU path

class _FakeComm:
    """A one-process stand-in for an MPI communicator (collectives of a
    size-1 group never reach MPI)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


def test_gpu_gradient_buckets_go_through_nccl(monkeypatch):
    """A model whose parameters are device arrays has its gradient buckets
    summed by NCCL on the current stream (a recording stand-in here, that
    plays a second rank with the same gradients) and scaled back in place."""
    import types
    from cuda_shim import fake_cupy
    from convcore import distributed
    from convcore.nn.module import Module, Parameter

    fake = fake_cupy.make_module()
    calls = []

    class Communicator:
        def __init__(self, size, uid, rank):
            calls.append(("init", size, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):
            assert send == recv and op == "sum" and stream == 7
            calls.append(("allReduce", count, dtype))
            buffers[send][...] *= 2      # a second rank with the same gradients

        def abort(self):
            calls.append(("abort",))

    buffers = {}
    nccl = types.SimpleNamespace(get_unique_id=lambda: "uid", NcclCommunicator=Communicator,
                                 NCCL_FLOAT32="f32", NCCL_FLOAT64="f64", NCCL_SUM="sum")
    fake.multiply = np.multiply
    fake.cuda.nccl = nccl
    fake.cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=7)
    fake.cuda.Event = lambda disable_timing: types.SimpleNamespace(record=lambda: None,
                                                                   done=True)
    cuda_mod = types.ModuleType("cupy.cuda")
    cuda_mod.nccl = nccl
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda_mod)

    class Scale(Module):
        def __init__(self, n):
            super().__init__()
            self.weight = Parameter(fake.asarray(np.arange(n, dtype=np.float32)))

        def backward(self, g):
            self.weight.grad[...] += g * np.float32(1)
            return g

    model = cc.nn.Sequential(Scale(5), Scale(300_000))     # two buckets at 1 MB
    for p in model.parameters():
        p._grad = fake.zeros(p.data.shape, np.float32)
    real_empty = fake.empty

    def empty(size, dtype):
        a = real_empty(size, dtype)
        buffers[id(a)] = a
        return a
    fake.empty = empty
    monkeypatch.setattr(type(fake.zeros(1, np.float32)), "data",
                        property(lambda self: types.SimpleNamespace(ptr=id(self))),
                        raising=False)
    group = distributed.ProcessGroup(_FakeComm(), timeout=5)
    reducer = distributed.GradientReducer(model, group, bucket_mb=1.0)
    assert reducer.gpu and len(reducer.buckets) == 2
    reducer.backward(fake.asarray(np.float32(3)), weight=4)
    reducer.finish(total_weight=8)     # two ranks of 4 samples
    assert [c[0] for c in calls] == ["init", "allReduce", "allReduce"]
    assert sorted(c[1] for c in calls[1:]) == [5, 300_000]
    for p in model.parameters():       # (3 * 4 + 3 * 4) / 8
        assert type(p.grad).__module__ == "cupy"
        np.testing.assert_array_equal(p.grad.get(), np.full(p.shape, 3.0, np.float32))
    reducer.close()
