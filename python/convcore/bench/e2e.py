"""End-to-end benchmark: images per second of whole models, convcore's eager
modules and its compiled engine against PyTorch's CPU build and ONNX
Runtime, on the same model with the same weights; and, with --memory, the
peak resident memory of each.

    python -m convcore bench --e2e [--threads 2] [--repeat 3] [--size S]
                                   [--models resnet18 mobilenet_v2 ...] [--batches 1 16]
                                   [--no-torch] [--no-ort] [--no-compiled] [--no-train]
                                   [--json out.json] [--markdown]
    python -m convcore bench --e2e --memory [the same options]
    python -m convcore bench --e2e --load out.json [--markdown]

Models: every model of the zoo (models._ZOO) by default, each at its own
input (model.input_shape: 3x224x224; lenet5 1x32x32, alexnet 3x227x227);
--size S builds every model for an SxS input instead (a model too small for
it is skipped with a note). Weights: models.get after manual_seed(0).

Libraries (inference: eval mode, forward only):
  convcore eager     the module tree, model(x)
  convcore compiled  convcore.compile(model, threads=threads), engine(x); the
                     column shows "-" while the package has no compile (and
                     for a model compile refuses)
  PyTorch            `to_torch(model)` (convcore.interop.torch): a mirror
                     of the module tree with torch.nn layers and the same
                     state-dict keys, under no_grad
                     (torch.set_num_threads(threads))
  ONNX Runtime       the PyTorch mirror exported with torch.onnx.export
                     (TorchScript exporter, opset 17, batch dimension
                     dynamic), CPUExecutionProvider, ORT_ENABLE_ALL,
                     intra_op_num_threads=threads, inter_op_num_threads=1;
                     "-" without onnxruntime (pip install convcore[bench])
                     or without PyTorch (the export needs it)
Training step (convcore eager and PyTorch only): train mode, forward,
cross-entropy, backward, SGD step (momentum 0.9); for each model these rows
come after its inference rows (the steps move the weights, which the
compiled engine and the ONNX session hold as they were).

Timings are medians of `repeat` runs, the libraries taking turns in blocks
(bench/timing.py's interleaved_medians: in each round each library's
warm-up, then one timed run, then the next library's; each round in the
reverse order of the one before). Ratios: compiled/ORT and
compiled/PyTorch are the compiled engine's images/s over the peer's, ratio
(the eager/torch column) convcore eager's over PyTorch's; above 1: convcore
is faster. Check: every library's eval output y against convcore eager's
y0 on the same input, max|y - y0| / max|y0|; a row's max_rel_diff is the
largest of these (diffs has each). A library that raises drops out of its
row (the error is printed and kept in the row's errors) instead of ending
the run.

Memory (--memory; no timing): each (library, model, batch) in a fresh
process (sys.executable -c _MEMORY_CHILD) that imports only what that
library needs (numpy and convcore; onnxruntime alone for ONNX Runtime, which
loads the .onnx file this process exported once per model; convcore.compile
loads the model this process saved once, straight into the engine, as a
deployment would, with no eager model; torch and convcore for PyTorch, whose
child builds the convcore model, mirrors it and frees it), builds the model
with the same seed, prepares its engine, then runs 3 inferences on the batch. Reported, from VmHWM/VmRSS in
/proc/self/status, in MB (2**20 bytes):
  setup_mb        the peak resident memory after setup: interpreter,
                  imports, weights, engine or session, the input batch
  peak_mb         the peak after the 3 inferences: the process's peak
  infer_extra_mb  what one inference adds above setup: the child resets
                  the peak to the current resident size after setup
                  (writing 5 to /proc/self/clear_refs, Linux 4.0+), then
                  infer_extra_mb = peak during the inferences - resident
                  after setup (exact_extra true); where the reset is refused,
                  peak_mb - setup_mb, a lower bound (exact_extra false)
  imports_mb      the resident size after the imports, before the model
Without /proc (not Linux) only the peaks are known, from ru_maxrss.

--json writes the rows and the machine (cpu, isa, threads, versions);
--markdown prints the tables of the run (or of --load's file) as Markdown.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import _core
from ..builder import MisfitWarning
from ..interop.torch import to_torch
from ..models import _ZOO
from ..nn.module import no_grad
from .timing import cpu_name, import_torch, interleaved_medians, write_results

DEFAULT_MODELS = tuple(_ZOO)
DEFAULT_BATCHES = (1, 16)
LIBRARIES = ("convcore", "compiled", "torch", "ort")
LABELS = {"convcore": "convcore eager", "compiled": "convcore compiled",
          "torch": "PyTorch", "ort": "ONNX Runtime"}


# ------------------------------------------------------------------- the libraries

def _compile_api() -> Optional[Callable]:
    """convcore.compile (the compiled engine) when this build has it, else None;
    looked up at each run, so that the benchmark uses it as soon as it exists."""
    return getattr(importlib.import_module(__name__.split(".")[0]), "compile", None)


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def isa_name() -> str:
    """The instruction set of convcore's kernels (_core.isa_name where the
    extension has it, else the GEMM kernel's, _core.gemm_isa)."""
    fn = getattr(_core, "isa_name", None) or getattr(_core, "gemm_isa", None)
    return str(fn()) if fn is not None else "unknown"


def _version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def build_model(name: str, size: Optional[int] = None):
    """The zoo model after manual_seed(0), in eval mode: at its own input, or
    for a size x size input (MisfitWarnings silenced)."""
    from .. import models as zoo
    from ..nn import init

    init.manual_seed(0)
    if size is None:
        return zoo.get(name).eval()
    with warnings.catch_warnings():  # a layer that floors at this size: the user's choice
        warnings.simplefilter("ignore", MisfitWarning)
        return zoo.get(name, input_size=size).eval()


def make_input(input_shape: Sequence[int], n: int):
    """The batch of n inputs (standard normal, float32) and the generator,
    which then draws the labels; the same for every library and process."""
    rng = np.random.default_rng(n)
    return rng.standard_normal((n,) + tuple(input_shape)).astype(np.float32), rng


def export_onnx(tmodel, x: np.ndarray, torch, f) -> None:
    """The torch mirror (eval) to ONNX into f (a path or a binary file object):
    TorchScript exporter, opset 17, input "x", output "y", batch dynamic.
    Its warnings and messages are silenced."""
    tmodel.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(tmodel, (torch.from_numpy(x),), f, opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def ort_session(model, threads: int, ort):
    """An ONNX Runtime CPU session of model (a path or the bytes of an .onnx);
    _MEMORY_CHILD makes the same one."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def rel_diff(y, y0) -> float:
    """max|y - y0| / max|y0|."""
    y, y0 = np.asarray(y, dtype=np.float64), np.asarray(y0, dtype=np.float64)
    return float(np.abs(y - y0).max() / max(float(np.abs(y0).max()), 1e-30))


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _guarded(fns: Dict[str, Callable], errors: Dict[str, str]) -> Dict[str, Callable]:
    """fns whose exceptions are kept in errors[name] instead of ending the run;
    a library with an error returns None from then on and drops out of the row."""
    def wrap(name, fn):
        def call():
            if name in errors:
                return None
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 (reported in the row)
                errors[name] = _error(e)
                return None
        return call
    return {name: wrap(name, fn) for name, fn in fns.items()}


# ------------------------------------------------------------------------ the runs

def _convcore_fns(model, x: np.ndarray, y: np.ndarray):
    """Inference and one training step of the convcore model."""
    from .. import optim
    from ..nn.loss import CrossEntropyLoss

    loss_fn = CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    # no gradient for the images, as PyTorch computes none for an input that
    # does not require grad
    model.set_input_grad(False)

    def infer():
        model.eval()
        return model(x)

    def train():
        model.train()
        loss_fn(model(x), y)
        model.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()

    return infer, train


def _torch_fns(tmodel, x: np.ndarray, y: np.ndarray, torch):
    """The same for the torch mirror."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(tmodel.parameters(), lr=1e-4, momentum=0.9)

    def infer():
        tmodel.eval()
        with torch.no_grad():
            return tmodel(xt)

    def train():
        tmodel.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(xt), yt).backward()
        opt.step()

    return infer, train


def _infer_fns(x: np.ndarray, model, compiled, tmodel, session, torch) -> Dict[str, Callable]:
    """One inference of batch x by each library present (None: absent)."""
    def eager():
        model.eval()
        with no_grad():  # as the mirror: nothing kept for a backward
            return model(x)

    fns = {"convcore": eager}
    if compiled is not None:
        fns["compiled"] = lambda: compiled(x)
    if tmodel is not None:
        xt = torch.from_numpy(x)

        def mirror():
            tmodel.eval()
            with torch.no_grad():
                return tmodel(xt)
        fns["torch"] = mirror
    if session is not None:
        fns["ort"] = lambda: session.run(["y"], {"x": x})[0]
    return fns


def _prepare(model, input_shape, threads: int, torch, ort, compile_fn, errors: Dict[str, str]):
    """The torch mirror, the compiled engine and the ONNX session of one model
    (None where unavailable; a failure is kept in errors)."""
    tmodel = compiled = session = None
    if compile_fn is not None:
        try:
            compiled = compile_fn(model, threads=threads)
        except Exception as e:  # noqa: BLE001
            errors["compiled"] = _error(e)
    if torch is not None:
        try:
            tmodel = to_torch(model).eval()
        except Exception as e:  # noqa: BLE001
            errors["torch"] = errors["ort"] = _error(e)
    if ort is not None and tmodel is not None:
        try:
            buf = io.BytesIO()
            export_onnx(tmodel, make_input(input_shape, 1)[0], torch, buf)
            session = ort_session(buf.getvalue(), threads, ort)
        except Exception as e:  # noqa: BLE001
            errors["ort"] = _error(e)
    return tmodel, compiled, session


# ------------------------------------------------------------ training memory

# A training step that would not fit is skipped with a note instead of
# being started: a process that runs out of memory is killed, with the
# table unfinished (NASNet-A Large's step at batch 16, 331x331, needs more
# than a 24 GB machine has, in PyTorch as in convcore).
_MEMORY_HEADROOM = 0.85  # of the memory available, the most a step may use


def _proc_kb(path: str, key: str) -> Optional[int]:
    """The value in kB of `key:` in a /proc file; None where unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _return_free_memory() -> None:
    """Hands the heap's free pages back to the system (the core's
    return_free_heap_pages, as the engine does after compiling), so that the
    resident size counts only what is live: the freed blocks of an earlier,
    larger batch otherwise stay resident, a step that reuses them measured as
    needing nothing, and MemAvailable does not count them."""
    gc.collect()
    _core.return_free_heap_pages()


def _step_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Runs fn once and returns the most bytes it held above the resident size
    before it (the heap's free pages handed back first; the peak reset by
    writing 5 to /proc/self/clear_refs, Linux 4.0+); None where that cannot
    be measured."""
    _return_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        fn()
        return None
    before = _proc_kb("/proc/self/status", "VmRSS")
    fn()
    peak = _proc_kb("/proc/self/status", "VmHWM")
    return None if before is None or peak is None else max(0, peak - before) * 1024


def _step_too_big(measured: Dict[str, tuple], batch: int, fixed: int) -> Optional[str]:
    """Why the training steps of `batch` would not fit, or None. measured:
    each library's (smaller batch, bytes of its first step); of these,
    `fixed` bytes (the gradients and momenta a first step allocates) do not
    grow with the batch, the rest is scaled by it. All libraries' together,
    as each keeps its buffers, against the memory available now
    (MemAvailable)."""
    _return_free_memory()
    available = _proc_kb("/proc/meminfo", "MemAvailable")
    sizes = [max(0, b - fixed) * batch / m for m, b in measured.values() if m < batch]
    if available is None or not sizes:
        return None
    need = sum(sizes)
    if need <= _MEMORY_HEADROOM * available * 1024:
        return None
    return (f"skipped: the steps need about {need / 2**30:.1f} GiB (scaled from a smaller "
            f"batch), {available / 2**20:.1f} GiB is available")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


_COLUMNS = (f"{'model':16} {'batch':>5} {'mode':10} {'input':>9} {'eager':>9} {'compiled':>9} "
            f"{'torch':>9} {'ORT':>9} {'cmp/ORT':>8} {'cmp/torch':>9} {'eager/torch':>11} "
            f"{'rel. diff':>9}")


def _format_row(r: dict) -> str:
    def num(v, width, spec=".2f"):
        return f"{v:{width}{spec}}" if v is not None else f"{'-':>{width}}"

    d = r["max_rel_diff"] if r["mode"] == "inference" else None
    return (f"{r['model']:16} {r['batch']:5d} {r['mode']:10} {_shape_text(r['input_shape']):>9} "
            f"{num(r['convcore_ips'], 9)} {num(r['compiled_ips'], 9)} {num(r['torch_ips'], 9)} "
            f"{num(r['ort_ips'], 9)} {num(r['compiled_vs_ort'], 8)} "
            f"{num(r['compiled_vs_torch'], 9)} {num(r['ratio'], 11)} "
            f"{num(d, 9, '.2e') if d is not None else ' ' * 9}")


def _machine(threads: int, torch, ort, compile_fn) -> dict:
    return dict(cpu=cpu_name(), machine=platform.machine(), isa=isa_name(), threads=threads,
                convcore=_version("convcore"), numpy=np.__version__,
                torch=getattr(torch, "__version__", None),
                onnxruntime=getattr(ort, "__version__", None), onnx=_version("onnx"),
                compiled=compile_fn is not None, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"))


def _notes(torch, ort, compile_fn, with_torch, with_ort, with_compiled) -> List[str]:
    notes = []
    if compile_fn is None:
        notes.append("compiled: " + ("convcore.compile is not in this build" if with_compiled
                                     else "--no-compiled"))
    if not with_torch:
        notes.append("torch: --no-torch")
    elif torch is None:
        notes.append("torch: PyTorch is not installed")
    if not with_ort:
        notes.append("ORT: --no-ort")
    elif ort is None:
        notes.append("ORT: onnxruntime is not installed (pip install convcore[bench])")
    elif torch is None:
        notes.append("ORT: the ONNX export needs PyTorch")
    return notes


def _print_head(print_fn, notes: List[str], header: str) -> None:
    """Prints the notes, then the table's header and its rule."""
    for note in notes:
        print_fn(f"  {note}")
    print_fn(header)
    print_fn("-" * len(header))


def _build_or_skip(name: str, size: Optional[int], skipped: Dict[str, str], print_fn):
    """build_model(name, size), or None with the reason kept in skipped[name]
    (and printed) when the model cannot be built."""
    try:
        return build_model(name, size)
    except Exception as e:  # noqa: BLE001 (e.g. too small an input for this model)
        skipped[name] = _error(e)
        if print_fn:
            print_fn(f"{name:16} skipped: {skipped[name]}")
        return None


def run(models: Optional[Sequence[str]] = None, batches: Sequence[int] = DEFAULT_BATCHES,
        threads: int = 2, repeat: int = 3, size: Optional[int] = None, with_torch: bool = True,
        print_fn=print, with_ort: bool = True, with_compiled: bool = True,
        train: bool = True) -> dict:
    """Times inference of every library and the training step of convcore
    eager and PyTorch for each model and batch (see the module's docstring);
    returns the rows and the machine, printing a table row by row."""
    models = list(DEFAULT_MODELS if models is None else models)
    _core.set_num_threads(threads)
    torch = import_torch(threads) if with_torch or with_ort else None
    ort = _import_ort() if with_ort else None
    compile_fn = _compile_api() if with_compiled else None
    info = _machine(threads, torch if with_torch else None, ort, compile_fn)
    if not with_torch and torch is not None:
        info["torch_export_only"] = torch.__version__
    notes = _notes(torch if with_torch else None, ort, compile_fn, with_torch, with_ort,
                   with_compiled)
    if ort is not None and torch is None:
        ort = None
    if print_fn:
        inputs = f"{size}x{size} input for every model" if size else "each model's own input"
        print_fn(f"end to end: {info['cpu']}, ISA {info['isa']}, {threads} threads, float32, "
                 f"{inputs}, median of {repeat} runs in blocks")
        print_fn("images/s; cmp/ORT, cmp/torch: compiled over ONNX Runtime, over PyTorch; "
                 "eager/torch: convcore eager over PyTorch (above 1: convcore faster); "
                 "rel. diff: largest max|y - y_eager| / max|y_eager|")
        _print_head(print_fn, notes, _COLUMNS)
    rows: List[dict] = []
    skipped: Dict[str, str] = {}
    for name in models:
        model = _build_or_skip(name, size, skipped, print_fn)
        if model is None:
            continue
        shape = tuple(int(d) for d in model.input_shape)
        setup_errors: Dict[str, str] = {}
        tmodel, compiled, session = _prepare(model, shape, threads,
                                             torch, ort, compile_fn, setup_errors)
        if print_fn:
            for lib, err in setup_errors.items():
                print_fn(f"  {name}: {LABELS[lib]} unavailable: {err}")
        common = dict(model=name, size=shape[-1], input_shape=list(shape), threads=threads)
        diff_of: Dict[int, Optional[float]] = {}
        classes: Dict[int, int] = {}
        for n in batches:  # inference, every library
            x, _ = make_input(shape, n)
            fns = _infer_fns(x, model, compiled, tmodel if with_torch else None, session, torch)
            errors: Dict[str, str] = {}
            fns = _guarded(fns, errors)
            y0 = fns["convcore"]()
            diffs = {}
            for lib, fn in fns.items():
                if lib != "convcore":
                    y = fn()
                    if y is not None and y0 is not None:
                        diffs[lib] = rel_diff(y.numpy() if hasattr(y, "numpy") else y, y0)
            if y0 is not None:
                classes[n] = int(np.shape(y0)[-1])
            med = interleaved_medians({k: f for k, f in fns.items() if k not in errors}, repeat)
            ips = {k: n / t for k, t in med.items() if k not in errors}
            diff_of[n] = max(diffs.values()) if diffs else None
            row = dict(common, batch=n, mode="inference",
                       convcore_ips=ips.get("convcore"), compiled_ips=ips.get("compiled"),
                       torch_ips=ips.get("torch"), ort_ips=ips.get("ort"),
                       diffs=diffs, max_rel_diff=diff_of[n],
                       errors=dict(setup_errors, **errors))
            row["ratio"] = _ratio(row["convcore_ips"], row["torch_ips"])
            row["compiled_vs_ort"] = _ratio(row["compiled_ips"], row["ort_ips"])
            row["compiled_vs_torch"] = _ratio(row["compiled_ips"], row["torch_ips"])
            rows.append(row)
            if print_fn:
                print_fn(_format_row(row))
                for lib, err in errors.items():
                    print_fn(f"  {LABELS[lib]} failed: {err}")
        compiled = session = None  # they hold the weights before the training steps
        gc.collect()
        step_memory: Dict[str, tuple] = {}  # library: (batch, bytes of a step)
        for n in batches if train else ():  # training step: convcore eager and PyTorch
            x, rng = make_input(shape, n)
            y = rng.integers(0, classes.get(n, 1000), n)
            fns = {"convcore": _convcore_fns(model, x, y)[1]}
            if tmodel is not None and with_torch:
                fns["torch"] = _torch_fns(tmodel, x, y, torch)[1]
            errors = {}
            too_big = _step_too_big(step_memory, n, fixed=2 * 4 * model.num_parameters())
            if too_big:
                errors = {lib: too_big for lib in fns}
                fns = {}
            fns = _guarded(fns, errors)
            for lib, fn in fns.items():  # the first call: its memory
                used = _step_bytes(fn)
                if used is not None and lib not in errors and (
                        lib not in step_memory or step_memory[lib][0] > n):
                    step_memory[lib] = (n, used)
            med = interleaved_medians(fns, repeat) if fns else {}
            ips = {k: n / t for k, t in med.items() if k not in errors}
            row = dict(common, batch=n, mode="train step",
                       convcore_ips=ips.get("convcore"), compiled_ips=None,
                       torch_ips=ips.get("torch"), ort_ips=None, diffs={},
                       max_rel_diff=diff_of.get(n), errors=errors,
                       compiled_vs_ort=None, compiled_vs_torch=None)
            row["ratio"] = _ratio(row["convcore_ips"], row["torch_ips"])
            rows.append(row)
            if print_fn:
                print_fn(_format_row(row))
                if too_big:
                    print_fn(f"  training step {too_big}")
                for lib, err in errors.items() if not too_big else ():
                    print_fn(f"  {LABELS[lib]} failed: {err}")
        del model, tmodel
        gc.collect()
    return dict(info, rows=rows, skipped=skipped, notes=notes, size=size, repeat=repeat,
                batches=list(batches), models=models)


# -------------------------------------------------------------------------- memory

# The child of one memory measurement (see the module's docstring): argv[1]
# is its spec in JSON; it prints one line of JSON. It imports only what its
# library needs: onnxruntime's child no convcore, no torch.
_MEMORY_CHILD = r'''
import gc, json, sys
spec = json.loads(sys.argv[1])
lib, n, threads = spec["library"], spec["batch"], spec["threads"]

def status():
    """VmRSS and VmHWM in MB; without /proc only the peak, from ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError, ValueError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"VmRSS": None, "VmHWM": peak / (2**20 if sys.platform == "darwin" else 1024)}

def reset_peak():
    """VmHWM back to VmRSS (Linux 4.0+); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

import numpy as np
if lib == "ort":
    import onnxruntime as ort
else:
    import convcore
    convcore.set_num_threads(threads)
    if lib == "torch":
        import torch
        torch.set_num_threads(threads)
        from convcore.interop.torch import to_torch
imports = status()
rng = np.random.default_rng(n)  # bench.e2e.make_input
x = rng.standard_normal([n] + spec["input_shape"]).astype(np.float32)
if lib == "ort":  # bench.e2e.ort_session
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(spec["onnx"], sess_options=so,
                                   providers=["CPUExecutionProvider"])
    infer = lambda: session.run(["y"], {"x": x})[0]
elif lib == "compiled":  # from the saved file, as ORT from its ONNX file
    engine = convcore.compile(spec["saved"], threads=threads)
    infer = lambda: engine(x)
else:
    convcore.manual_seed(0)  # bench.e2e.build_model
    model = convcore.models.get(spec["model"], **spec["kwargs"]).eval()
    if lib == "convcore":
        infer = lambda: model(x)
    else:
        tmodel = to_torch(model).eval()
        del model
        xt = torch.from_numpy(x)
        def infer():
            with torch.no_grad():
                return tmodel(xt)
gc.collect()
setup = status()
exact = reset_peak()
resident = status()["VmRSS"]
for _ in range(3):
    y = infer()
    del y
final = status()
print(json.dumps(dict(imports=imports["VmRSS"], setup_peak=setup["VmHWM"],
                     setup_rss=resident, final_peak=final["VmHWM"], exact=exact,
                     modules=[m for m in ("convcore", "onnxruntime", "torch")
                              if m in sys.modules])))
'''


def memory_child(library: str, model: str, batch: int, input_shape: Sequence[int],
                 threads: int = 2, size: Optional[int] = None, onnx_path: Optional[str] = None,
                 timeout: Optional[float] = 1800, saved_path: Optional[str] = None) -> dict:
    """Measures one (library, model, batch) in a fresh process (see the
    module's docstring); returns imports_mb, setup_mb, peak_mb,
    infer_extra_mb, exact_extra and imported (which of convcore, onnxruntime
    and torch the child had imported). library: convcore, compiled, torch or
    ort (which needs onnx_path, the model's export); compiled loads
    saved_path (the model saved by convcore.save) straight into the engine,
    as a deployment would, with no eager model in the process."""
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {', '.join(LIBRARIES)}, got {library!r}")
    if library == "ort" and not onnx_path:
        raise ValueError("the ort child needs onnx_path, the model exported by export_onnx")
    if library == "compiled" and not saved_path:
        raise ValueError("the compiled child needs saved_path, the model saved by convcore.save")
    spec = dict(library=library, model=model, batch=int(batch), threads=int(threads),
                input_shape=[int(d) for d in input_shape], onnx=onnx_path, saved=saved_path,
                kwargs={} if size is None else {"input_size": int(size)})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if library != "ort":  # the convcore this process runs, wherever it comes from
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # convcore/
        here = os.path.dirname(package)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"the {library} child failed: {lines[-1]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    setup, final = m["setup_peak"], m["final_peak"]
    if m["exact"] and m["setup_rss"] is not None:  # final_peak: the inferences' own
        peak, extra = max(setup, final), final - m["setup_rss"]
    else:
        peak, extra = final, final - setup
    return dict(imports_mb=m["imports"], setup_mb=setup, peak_mb=peak,
                infer_extra_mb=max(extra, 0.0), exact_extra=bool(m["exact"]),
                imported=m["modules"])


_MEMORY_LIBS = ("convcore", "compiled", "ort", "torch")
_SHORT = {"convcore": "convcore eager", "compiled": "compiled", "torch": "PyTorch",
          "ort": "ORT"}


def _memory_cell(m: dict) -> str:
    return f"{m['setup_mb']:.0f} / {m['peak_mb']:.0f} (+{m['infer_extra_mb']:.0f})"


def measure_memory(models: Optional[Sequence[str]] = None,
                   batches: Sequence[int] = DEFAULT_BATCHES, threads: int = 2,
                   size: Optional[int] = None, with_torch: bool = True, print_fn=print,
                   with_ort: bool = True, with_compiled: bool = True) -> dict:
    """Peak resident memory of each library's inference per model and batch,
    each in a fresh process (memory_child); the ONNX file of a model is
    exported here once, to a temporary directory."""
    models = list(DEFAULT_MODELS if models is None else models)
    torch = import_torch(threads) if with_torch or with_ort else None
    ort_found = with_ort and importlib.util.find_spec("onnxruntime") is not None
    compile_fn = _compile_api() if with_compiled else None
    libs = ["convcore"] + (["compiled"] if compile_fn is not None else []) + \
        (["ort"] if ort_found and torch is not None else []) + \
        (["torch"] if with_torch and torch is not None else [])
    info = _machine(threads, torch if with_torch else None, None, compile_fn)
    info["onnxruntime"] = _version("onnxruntime") if ort_found else None
    notes = _notes(torch if with_torch else None, True if ort_found else None, compile_fn,
                   with_torch, with_ort, with_compiled)
    header = (f"{'model':16} {'batch':>5} {'input':>9} " +
              " ".join(f"{_SHORT[lib]:>20}" for lib in _MEMORY_LIBS))
    if print_fn:
        print_fn(f"memory of one inference: {info['cpu']}, {threads} threads; MB, each in a "
                 f"fresh process: peak after setup / peak after 3 inferences (+ what an "
                 f"inference adds above setup)")
        _print_head(print_fn, notes, header)
    rows: List[dict] = []
    skipped: Dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="convcore-e2e-") as tmp:
        for name in models:
            model = _build_or_skip(name, size, skipped, print_fn)
            if model is None:
                continue
            shape = tuple(int(d) for d in model.input_shape)
            setup_errors: Dict[str, str] = {}
            onnx_path = None
            if "ort" in libs:
                try:
                    onnx_path = os.path.join(tmp, f"{name}.onnx")
                    export_onnx(to_torch(model), make_input(shape, 1)[0], torch, onnx_path)
                except Exception as e:  # noqa: BLE001
                    setup_errors["ort"], onnx_path = _error(e), None
            saved_path = None
            if "compiled" in libs:
                saved_path = os.path.join(tmp, f"{name}.safetensors")
                model.eval().save(saved_path)
            del model
            gc.collect()
            for n in batches:
                memory, errors = {}, dict(setup_errors)
                for lib in libs:
                    if lib in errors:
                        continue
                    try:
                        memory[lib] = memory_child(lib, name, n, shape, threads, size, onnx_path,
                                                   saved_path=saved_path)
                    except Exception as e:  # noqa: BLE001
                        errors[lib] = _error(e)
                row = dict(model=name, batch=n, input_shape=list(shape), threads=threads,
                           memory=memory, errors=errors)
                rows.append(row)
                if print_fn:
                    cells = []
                    for lib in _MEMORY_LIBS:
                        m = memory.get(lib)
                        cells.append(f"{_memory_cell(m) if m else '-':>20}")
                    print_fn(f"{name:16} {n:5d} {_shape_text(shape):>9} " + " ".join(cells))
                    for lib, err in errors.items():
                        print_fn(f"  {LABELS[lib]}: {err}")
            for path in (onnx_path, saved_path):
                if path and os.path.exists(path):
                    os.remove(path)
    return dict(info, memory_rows=rows, skipped=skipped, notes=notes, size=size,
                batches=list(batches), models=models)


# ------------------------------------------------------------------------- markdown

def markdown(result: dict) -> str:
    """The tables of a run (run or measure_memory's result, or its --json
    file) in Markdown, with the machine."""
    def num(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    versions = ", ".join(f"{label} {result[key]}" for key, label in (
        ("convcore", "convcore"), ("torch", "PyTorch"), ("onnxruntime", "ONNX Runtime"))
        if result.get(key))
    out = [f"Machine: {result.get('cpu', '?')} ({result.get('machine', '?')}), ISA "
           f"{result.get('isa', '?')}, {result.get('threads', '?')} threads; {versions}; "
           f"compiled engine: {'yes' if result.get('compiled') else 'not in this build'}."]
    if result.get("size"):
        out[0] += f" Input {result['size']}x{result['size']} for every model."

    def model_cell(r):
        shape = r.get("input_shape")
        return r["model"] if not shape or list(shape) == [3, 224, 224] else \
            f"{r['model']} ({_shape_text(shape)})"

    rows = result.get("rows") or []
    inference = [r for r in rows if r["mode"] == "inference"]
    if inference:
        out += ["", f"Inference, images/s (median of {result.get('repeat', '?')}; higher is "
                    f"better); ratios above 1: the compiled engine is faster.", "",
                "| model | batch | convcore eager | compiled | PyTorch | ORT | compiled/ORT "
                "| compiled/PyTorch | max rel diff |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in inference:
            out.append(f"| {model_cell(r)} | {r['batch']} | {num(r['convcore_ips'])} | "
                       f"{num(r.get('compiled_ips'))} | {num(r['torch_ips'])} | "
                       f"{num(r.get('ort_ips'))} | {num(r.get('compiled_vs_ort'), '.2f')} | "
                       f"{num(r.get('compiled_vs_torch'), '.2f')} | "
                       f"{num(r['max_rel_diff'], '.1e')} |")
    training = [r for r in rows if r["mode"] == "train step"]
    if training:
        out += ["", "Training step (forward, cross-entropy, backward, SGD), images/s.", "",
                "| model | batch | convcore eager | PyTorch | convcore/PyTorch |",
                "|---|--:|--:|--:|--:|"]
        for r in training:
            out.append(f"| {model_cell(r)} | {r['batch']} | {num(r['convcore_ips'])} | "
                       f"{num(r['torch_ips'])} | {num(r['ratio'], '.2f')} |")
    memory = result.get("memory_rows") or []
    if memory:
        out += ["", "Memory of one inference, MB, each in a fresh process: the peak resident "
                    "size after setup / after 3 inferences (+ what an inference adds above "
                    "setup).", "",
                "| model | batch | convcore eager | compiled | ORT | PyTorch |",
                "|---|--:|--:|--:|--:|--:|"]
        for r in memory:
            cells = []
            for lib in _MEMORY_LIBS:
                m = r["memory"].get(lib)
                cells.append(_memory_cell(m) if m else "-")
            out.append(f"| {model_cell(r)} | {r['batch']} | " + " | ".join(cells) + " |")
    failures = [(r["model"], r["batch"], r.get("mode", "memory"), lib, err)
                for r in rows + memory for lib, err in (r.get("errors") or {}).items()]
    if failures or result.get("skipped") or result.get("notes"):
        out.append("")
        out += [f"- {note}" for note in result.get("notes") or []]
        out += [f"- {name}: skipped ({err})" for name, err in (result.get("skipped") or {}).items()]
        out += [f"- {m} batch {n} {mode}: {LABELS.get(lib, lib)} "
                f"{err if err.startswith('skipped') else f'failed ({err})'}"
                for m, n, mode, lib, err in failures]
    return "\n".join(out)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m convcore bench --e2e",
                                description="end-to-end images/s of the zoo's models: convcore "
                                            "eager and compiled vs PyTorch and ONNX Runtime")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=None,
                   help="input side for every model (default: each model's own input)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(_ZOO),
                   metavar="MODEL", help="zoo models (default: all: %(default)s)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--no-torch", action="store_true", help="no PyTorch column")
    p.add_argument("--no-ort", action="store_true", help="no ONNX Runtime column")
    p.add_argument("--no-compiled", action="store_true", help="no convcore.compile column")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--memory", action="store_true",
                   help="measure the peak memory of one inference instead of timing")
    p.add_argument("--json", help="write the rows and the machine to this file")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--load", metavar="JSON", help="no run: the results of this --json file")
    args = p.parse_args(argv)
    if args.load:
        with open(args.load) as f:
            result = json.load(f)
        print(markdown(result))
        return
    common = dict(models=args.models, batches=args.batches, threads=args.threads,
                  size=args.size, with_torch=not args.no_torch, with_ort=not args.no_ort,
                  with_compiled=not args.no_compiled)
    if args.memory:
        result = measure_memory(**common)
    else:
        result = run(repeat=args.repeat, train=not args.no_train, **common)
    write_results(result, args.json, markdown(result) if args.markdown else None)


if __name__ == "__main__":
    main()
