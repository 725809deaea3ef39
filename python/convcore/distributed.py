"""Data-parallel training over MPI (extra `distributed`: mpi4py and an MPI
such as the mpich wheel).

Every rank holds the whole model. Each step, every rank runs forward and
backward on its own slice of one global batch, the gradients are summed
across ranks (weighted by each rank's sample count, so the result is the
gradient of the global batch) and every rank takes the same optimiser step:

    from convcore import distributed
    group = distributed.init()              # MPI.COMM_WORLD, from mpiexec
    fit(model, loss_fn, optimizer, DataLoader(x, y, batch_size=32, shuffle=True, seed=0),
        distributed=group)                  # 32 per rank, 32 * size per step

Run it with `mpiexec -n 2 python train.py`. A run with R ranks and per-rank
batch B takes the same steps as one process with batch R*B (same order of
samples, same augmentation draws). Batch norm normalises each rank's slice
by its own statistics, as PyTorch's DistributedDataParallel does without
SyncBatchNorm; its running statistics are taken from rank 0 after each epoch.

Nothing hangs: every collective waits at most `timeout` seconds and then
raises DistributedError, and an exception that nothing catches on one rank
ends the job on every rank (MPI_Abort), so mpiexec returns with an error.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import sys
import time
from typing import Iterator, List, Tuple

import numpy as np

from ._arrays import array_module

__all__ = ["DistributedError", "GradientReducer", "NcclAllReduce", "ProcessGroup", "ShardedLoader",
           "SingleProcessGroup", "init"]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stalled or disagrees."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError('convcore.distributed needs mpi4py and an MPI library: '
                          'pip install "convcore[distributed]"') from None
    return MPI


class ProcessGroup:
    """The ranks of one job and the collectives convcore needs, each bounded
    by `timeout` seconds. Made by init()."""

    # A wait polls without sleeping this long (a step's all-reduce usually
    # lands within it), then backs off to sleeps of up to 1 ms.
    SPIN_SECONDS = 2e-3

    def __init__(self, comm, timeout: float = 300.0):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not timeout > 0 or not math.isfinite(timeout):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.comm = comm
        self.timeout = float(timeout)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ProcessGroup(rank {self.rank} of {self.size}, timeout {self.timeout:g} s)"

    # -- waiting, with a deadline ------------------------------------------------------
    def wait(self, requests, what: str) -> None:
        """Completes MPI requests, or raises DistributedError after `timeout`
        seconds. Polls, first without sleeping, then with short sleeps so that
        a rank waiting long for a slower one leaves the cores to it."""
        MPI = _mpi()
        if not isinstance(requests, list):
            requests = [requests]
        start = time.monotonic()
        deadline = start + self.timeout
        delay = 0.0
        while not MPI.Request.Testall(requests):
            now = time.monotonic()
            if now > deadline:
                raise self.timed_out(what)
            if now - start > self.SPIN_SECONDS:
                time.sleep(delay)
                delay = min(2 * delay if delay else 1e-5, 1e-3)

    def timed_out(self, what: str) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.size}: {what} did not complete within "
            f"{self.timeout:g} s: another rank has died, stalled or left the job")

    # -- collectives -----------------------------------------------------------------
    def allreduce_(self, array: np.ndarray, what: str = "all-reduce") -> np.ndarray:
        """Sums a contiguous array over the ranks, in place."""
        if self.size == 1:
            return array
        MPI = _mpi()
        self.wait(self.comm.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM), what)
        return array

    def broadcast_(self, array: np.ndarray, root: int = 0, what: str = "broadcast") -> np.ndarray:
        """Overwrites a contiguous array with root's, in place."""
        if self.size == 1:
            return array
        self.wait(self.comm.Ibcast(array, root=root), what)
        return array

    def allgather_bytes(self, data: bytes, what: str = "all-gather") -> List[bytes]:
        """Every rank's bytes, in rank order."""
        if self.size == 1:
            return [data]
        MPI = _mpi()
        sizes = np.zeros(self.size, dtype=np.int64)
        self.wait(self.comm.Iallgather(np.array([len(data)], dtype=np.int64), sizes),
                  f"{what} (sizes)")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        send = np.frombuffer(data, dtype=np.uint8) if data else np.empty(0, np.uint8)
        self.wait(self.comm.Iallgatherv(send, [out, sizes, offsets, MPI.BYTE]), what)
        return [out[o:o + s].tobytes() for o, s in zip(offsets, sizes)]

    def broadcast_object(self, obj=None, root: int = 0, what: str = "broadcast"):
        """root's picklable object on every rank (others pass anything)."""
        if self.size == 1:
            return obj
        data = pickle.dumps(obj) if self.rank == root else b""
        size = np.array([len(data)], dtype=np.int64)
        self.broadcast_(size, root, f"{what} (size)")
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else \
            np.empty(int(size[0]), dtype=np.uint8)
        self.broadcast_(buf, root, what)
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def abort(self, code: int = 1) -> None:
        """Ends every rank of the job now (MPI_Abort)."""
        self.comm.Abort(code)

    # -- models ----------------------------------------------------------------------
    def check_same_model(self, model) -> None:
        """Raises ValueError on every rank unless every rank's model has the same
        parameter and buffer names, shapes and dtypes."""
        mine = [(name, tuple(p.data.shape), str(p.data.dtype))
                for name, p in model.named_parameters()]
        mine += [(name, tuple(np.shape(b)), str(np.asarray(b).dtype))
                 for name, b in model.named_buffers()]
        signatures = [pickle.loads(b) for b in
                      self.allgather_bytes(pickle.dumps(mine), "model shape check")]
        for r, theirs in enumerate(signatures):
            if theirs != signatures[0]:
                raise ValueError(f"rank {self.rank}: the model differs across ranks: "
                                 f"{_first_difference(signatures[0], theirs, r)}")

    def broadcast_model(self, model, root: int = 0) -> None:
        """Copies root's parameters and buffers into every rank's model."""
        for name, p in model.named_parameters():
            self.broadcast_(p.data, root, f"broadcast of parameter {name!r}")
        self.broadcast_model_buffers(model, root)

    def broadcast_model_buffers(self, model, root: int = 0) -> None:
        """Copies root's buffers (batch norm's running statistics) to every rank."""
        for mod_name, mod in model.named_modules():
            for name, b in list(mod._buffers.items()):
                arr = np.ascontiguousarray(np.array(b, copy=True))
                key = f"{mod_name}.{name}" if mod_name else name
                self.broadcast_(arr, root, f"broadcast of buffer {key!r}")
                mod._set_buffer(name, arr)

    def check_identical(self, model) -> None:
        """Raises DistributedError on every rank unless the parameters are
        bit-identical on every rank (compared by a hash)."""
        digest = hashlib.sha256()
        for _, p in model.named_parameters():
            digest.update(np.ascontiguousarray(p.data).tobytes())
        hashes = self.allgather_bytes(digest.digest(), "parameter check")
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            raise DistributedError(f"rank {self.rank}: the parameters of ranks {differ} differ "
                                   f"from rank 0's after the same steps")

    def shard(self, loader) -> "ShardedLoader":
        """This rank's view of a DataLoader whose batch_size is per rank."""
        return loader if isinstance(loader, ShardedLoader) else ShardedLoader(loader, self)

    def gradient_reducer(self, model) -> "GradientReducer":
        """What sums the model's gradients over the ranks in fit()."""
        return GradientReducer(model, self)


class SingleProcessGroup:
    """The group of one process that fit() and evaluate() run in when
    training is not distributed: the interface of ProcessGroup, with every
    collective returning its input and every model check passing, so that
    one code path serves both. Needs no MPI. (A ProcessGroup of size 1, from
    init() without mpiexec, still shards the loaders and reduces gradients.)"""

    rank = 0
    size = 1
    is_root = True

    def __repr__(self) -> str:
        return "SingleProcessGroup()"

    def allreduce_(self, array: np.ndarray, what: str = "all-reduce") -> np.ndarray:
        return array

    def broadcast_(self, array: np.ndarray, root: int = 0, what: str = "broadcast") -> np.ndarray:
        return array

    def allgather_bytes(self, data: bytes, what: str = "all-gather") -> List[bytes]:
        return [data]

    def broadcast_object(self, obj=None, root: int = 0, what: str = "broadcast"):
        return obj

    def abort(self, code: int = 1) -> None:
        """Ends the job, which is this process (SystemExit)."""
        raise SystemExit(code)

    def check_same_model(self, model) -> None:
        pass

    def broadcast_model(self, model, root: int = 0) -> None:
        pass

    def broadcast_model_buffers(self, model, root: int = 0) -> None:
        pass

    def check_identical(self, model) -> None:
        pass

    def shard(self, loader):
        """The loader itself: any iterable of batches, not only a DataLoader."""
        return loader

    def gradient_reducer(self, model) -> "_LocalGradients":
        return _LocalGradients(model)


class _LocalGradients:
    """The GradientReducer of a SingleProcessGroup: backward() runs the
    model's backward and the gradients stay as it leaves them (no buckets,
    no weighting, so they are bit for bit those of a plain backward)."""

    def __init__(self, model):
        self.model = model

    def backward(self, grad_output, weight: float) -> None:
        self.model.backward(grad_output)

    def skip_backward(self) -> None:
        """A batch without samples: the gradients stay zero."""

    def finish(self, total_weight: float) -> None:
        pass

    def close(self) -> None:
        pass


def _first_difference(ref, other, rank: int) -> str:
    for i in range(max(len(ref), len(other))):
        a = ref[i] if i < len(ref) else None
        b = other[i] if i < len(other) else None
        if a != b:
            show = (lambda e: "nothing" if e is None else f"{e[0]!r} {e[1]} {e[2]}")
            return f"entry {i}: rank 0 has {show(a)}, rank {rank} has {show(b)}"
    return "same entries"


class ShardedLoader:
    """Splits each global batch of a DataLoader across the ranks.

    The global batch holds loader.batch_size * size samples in the order the
    loader would give them to one process with that batch size (the same
    shuffling and augmentation draws on every rank); rank r takes the r-th
    contiguous slice. The last global batch may be short, so a slice can be
    short or empty: fit() weights each rank's gradient by its sample count."""

    def __init__(self, loader, group: ProcessGroup):
        from .data import DataLoader
        if not isinstance(loader, DataLoader):
            raise TypeError(f"loader must be a convcore.data.DataLoader, got "
                            f"{type(loader).__name__}")
        self.loader = loader
        self.group = group
        self.batch_size = loader.batch_size   # per rank

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.group.size

    @property
    def rng(self) -> np.random.Generator:
        return self.loader.rng

    def __len__(self) -> int:
        n = len(self.loader.y)
        g = self.global_batch_size
        return n // g if self.loader.drop_last else math.ceil(n / g)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        src = self.loader
        n, g = len(src.y), self.global_batch_size
        order = src.rng.permutation(n) if src.shuffle else np.arange(n)
        for b in range(len(self)):
            batch = order[b * g:min((b + 1) * g, n)]
            lo = min(self.group.rank * self.batch_size, len(batch))
            hi = min(lo + self.batch_size, len(batch))
            if src.augment is None:
                idx = batch[lo:hi]
                yield np.ascontiguousarray(src.x[idx]), src.y[idx]
            else:
                # the augmentation draws its numbers for the whole global batch, so
                # that every rank advances the generator exactly as one process would
                xb = np.ascontiguousarray(src.augment(src.x[batch], src.rng))
                yield np.ascontiguousarray(xb[lo:hi]), src.y[batch[lo:hi]]

    def __repr__(self) -> str:
        return (f"ShardedLoader(rank {self.group.rank} of {self.group.size}, "
                f"{self.batch_size} per rank, {self.loader!r})")


class NcclAllReduce:
    """Sums GPU buffers over the ranks with NCCL (through CuPy), on the current
    CUDA stream: the GPU counterpart of MPI_Iallreduce for a model on the GPU
    (one GPU per rank). MPI carries NCCL's unique id from rank 0, and MPI
    stays the job's launcher and carries the small host-side figures."""

    def __init__(self, group: ProcessGroup):
        try:
            from cupy.cuda import nccl
        except ImportError:
            raise ImportError("data-parallel training on GPUs needs CuPy with NCCL: "
                              'pip install "convcore[cuda,distributed]" nvidia-nccl-cu13') from None
        self.nccl, self.group = nccl, group
        uid = nccl.get_unique_id() if group.is_root else None
        uid = group.broadcast_object(uid, what="NCCL's unique id")
        self.comm = nccl.NcclCommunicator(group.size, uid, group.rank)

    def start(self, buf) -> None:
        import cupy
        kinds = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                 np.dtype(np.float64): self.nccl.NCCL_FLOAT64}
        stream = cupy.cuda.get_current_stream()
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kinds[np.dtype(buf.dtype)],
                            self.nccl.NCCL_SUM, stream.ptr)

    def wait(self, what: str) -> None:
        """Waits for the work queued on the stream, at most the group's timeout;
        then aborts the communicator and raises DistributedError."""
        import cupy
        done = cupy.cuda.Event(disable_timing=True)
        done.record()
        deadline = time.monotonic() + self.group.timeout
        while not done.done:
            if time.monotonic() > deadline:
                self.comm.abort()
                raise self.group.timed_out(what)
            time.sleep(1e-4)


class GradientReducer:
    """Sums the gradients of a model's parameters over the ranks, in buckets
    of about bucket_mb megabytes that leave while the backward pass goes on.

    Buckets hold the parameters in reverse order of registration (roughly
    the order in which backward finishes them). The reducer wraps the
    backward() of every module that owns parameters; when the last module
    of a bucket has run its backward, the bucket's all-reduce starts (with
    overlap=False, all start after the whole backward). Each rank's
    gradients are multiplied by `weight` (its sample count) and the sums
    divided by the total weight, so a rank with fewer samples counts for
    less. A module must run its backward once per step (no module applied
    twice in one forward pass). close() removes the wrappers. For a model on
    the GPU (after model.to("cuda")), the buckets live on the GPU and NCCL
    sums them (NcclAllReduce)."""

    def __init__(self, model, group: ProcessGroup, bucket_mb: float = 4.0,
                 overlap: bool = True):
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or \
                not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        self.model, self.group, self.overlap = model, group, bool(overlap)
        owners = [m for m in model.modules() if m._parameters]
        params, seen = [], set()
        for m in owners:
            for p in m._parameters.values():
                if id(p) not in seen:      # a shared parameter is reduced once
                    seen.add(id(p))
                    params.append(p)
        self.xp = array_module(params[0].data) if params else np
        self.gpu = self.xp is not np
        self._nccl = NcclAllReduce(group) if self.gpu else None
        self.buckets: List[Tuple[list, np.ndarray]] = []
        limit = int(bucket_mb * 2**20)
        current, nbytes = [], 0
        for p in reversed(params):
            if current and (nbytes + p.data.nbytes > limit or p.data.dtype != current[0].data.dtype):
                self._add_bucket(current)
                current, nbytes = [], 0
            current.append(p)
            nbytes += p.data.nbytes
        if current:
            self._add_bucket(current)
        bucket_of = {id(p): i for i, (ps, _) in enumerate(self.buckets) for p in ps}
        self._modules = owners
        self._weight = None
        self._requests: list = []
        self._next = 0
        # how many owning modules each bucket waits for, and which buckets each module feeds
        self._needed = [0] * len(self.buckets)
        for m in owners:
            feeds = sorted({bucket_of[id(p)] for p in m._parameters.values()})
            for i in feeds:
                self._needed[i] += 1
            if self.overlap:
                self._wrap(m, feeds)

    def _add_bucket(self, params) -> None:
        size = sum(p.data.size for p in params)
        self.buckets.append((params, self.xp.empty(size, dtype=params[0].data.dtype)))

    def _wrap(self, module, feeds) -> None:
        original = module.backward

        def backward(grad_output):
            result = original(grad_output)
            if self._weight is not None:
                for i in feeds:
                    self._remaining[i] -= 1
                self._send_ready()
            return result

        object.__setattr__(module, "backward", backward)   # an instance attribute, not a child

    def close(self) -> None:
        """Removes the backward wrappers."""
        for m in self._modules:
            m.__dict__.pop("backward", None)

    def backward(self, grad_output, weight: float):
        """Runs model.backward(grad_output), sending buckets as they complete;
        then call finish()."""
        self._weight = float(weight)
        self._remaining = list(self._needed)
        self._requests, self._next = [], 0
        try:
            self.model.backward(grad_output)
            while self._next < len(self.buckets):   # overlap off, or modules that did not run
                self._send(self._next)
        finally:
            self._weight = None

    def _send_ready(self) -> None:
        # Buckets leave in index order on every rank: MPI needs the same order of
        # collectives everywhere, and a rank without samples sends zeros in that order.
        while self._next < len(self.buckets) and self._remaining[self._next] <= 0:
            self._send(self._next)
        if self._requests and not self.gpu:   # let MPI move the buckets already sent
            _mpi().Request.Testall(self._requests)

    def skip_backward(self) -> None:
        """For a rank with no samples in this step: contributes zeros."""
        self._requests = []
        for i, (_, flat) in enumerate(self.buckets):
            flat[...] = 0
            self._start(i)

    def _send(self, i: int) -> None:
        params, flat = self.buckets[i]
        pos = 0
        for p in params:
            n = p.data.size
            self.xp.multiply(p.grad.reshape(-1), self._weight, out=flat[pos:pos + n])
            pos += n
        self._next = i + 1
        self._start(i)

    def _start(self, i: int) -> None:
        if self.gpu:
            self._nccl.start(self.buckets[i][1])
            self._requests.append(i)
            return
        MPI = _mpi()
        self._requests.append(self.group.comm.Iallreduce(MPI.IN_PLACE, self.buckets[i][1],
                                                         op=MPI.SUM))

    def finish(self, total_weight: float) -> None:
        """Waits for every bucket and writes sum / total_weight into the grads."""
        if self.gpu:
            self._nccl.wait("the all-reduce of the gradients")
        else:
            self.group.wait(self._requests, "the all-reduce of the gradients")
        scale = 1.0 / total_weight if total_weight > 0 else 0.0
        for params, flat in self.buckets:
            pos = 0
            for p in params:
                n = p.data.size
                self.xp.multiply(flat[pos:pos + n].reshape(p.data.shape), scale, out=p.grad)
                pos += n


def init(comm=None, timeout: float = 300.0, abort_on_exception: bool = True) -> ProcessGroup:
    """The process group of this MPI job (MPI.COMM_WORLD unless comm is given).

    timeout bounds every collective (seconds). abort_on_exception installs
    an exception hook so that an exception nothing catches on one rank ends
    the whole job (MPI_Abort) instead of leaving the other ranks waiting."""
    MPI = _mpi()
    group = ProcessGroup(MPI.COMM_WORLD if comm is None else comm, timeout)
    if abort_on_exception and group.size > 1:
        previous = sys.excepthook

        def abort_job(kind, value, tb):
            previous(kind, value, tb)
            sys.stderr.write(f"convcore.distributed: rank {group.rank} failed; ending the job on "
                             f"all {group.size} ranks\n")
            sys.stderr.flush()
            # a moment for mpiexec to pass the traceback on: the abort kills its
            # forwarding too, and under load the whole message was lost
            time.sleep(0.5)
            group.abort(1)

        sys.excepthook = abort_job
    return group

