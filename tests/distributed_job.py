"""Jobs that tests/test_distributed.py runs under `mpiexec -n 2` (one thread
per rank). Usage: python distributed_job.py SCENARIO OUT_DIR

equivalence  fit with 2 ranks x batch 8 for 2 epochs (lenet5 on 300 digits, a
             short last batch, augmentation, a validation loader); rank 0 then
             repeats it in one process with batch 16 and writes both results
mismatch     rank 1 builds a different model: both ranks must fail clearly
dies         rank 1 dies (os._exit) in the middle of the first epoch
leaves       rank 1 returns without error in the middle of training: rank 0
             must time out, not hang
resume       2 epochs with a checkpoint, then a fresh start resuming to 3 epochs,
             against a straight 3-epoch run
"""
import json
import os
import sys

import numpy as np

import convcore as cc
from convcore import distributed
from convcore.data import DataLoader, RandomShift, load_digits
from convcore.models import lenet5
from convcore.nn import CrossEntropyLoss, init
from convcore.optim import SGD, StepLR
from convcore.train import fit

cc.set_num_threads(1)


def data(n=300):
    x, y = load_digits(size=28, padding=2)
    return x[:n], y[:n]


def make(seed=0, classes=10):
    init.manual_seed(seed)
    model = lenet5(num_classes=classes, input_size=(1, 32, 32))
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, opt


def run(group, batch, epochs=2, checkpoint=None, resume=False, seed=0, val=True, **kw):
    x, y = data()
    model, opt = make(seed)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    loader = DataLoader(x, y, batch_size=batch, shuffle=True, seed=seed, augment=RandomShift(1))
    val_loader = DataLoader(x[:101], y[:101], batch_size=batch) if val else None
    hist = fit(model, CrossEntropyLoss(), opt, loader, val_loader, epochs=epochs,
               scheduler=sched, progress=False, distributed=group, checkpoint=checkpoint,
               resume=resume, **kw)
    return model, hist


def params(model):
    return {k: v.astype(np.float64) for k, v in model.state_dict().items()}


def worst_rel(a, b):
    return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(b[k])) + 1e-30)) for k in a)


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    group = distributed.init(timeout=float(os.environ.get("CC_TIMEOUT", "60")))
    result = {"rank": group.rank, "size": group.size}

    if scenario == "equivalence":
        model, hist = run(group, batch=8)
        state = model.state_dict()
        digest = distributed.hashlib.sha256(b"".join(
            np.ascontiguousarray(v).tobytes() for v in state.values())).hexdigest()
        result.update(digest=digest, val_acc=hist.val_acc, train_loss=hist.train_loss)
        if group.is_root:
            single, single_hist = run(None, batch=8 * group.size)
            result["worst_rel_param"] = worst_rel(params(model), params(single))
            result["single_val_acc"] = single_hist.val_acc
            result["single_train_loss"] = single_hist.train_loss
    elif scenario == "mismatch":
        model, opt = make(0, classes=10 if group.rank == 0 else 9)
        x, y = data()
        try:
            fit(model, CrossEntropyLoss(), opt, DataLoader(x, y, batch_size=8), epochs=1,
                progress=False, distributed=group)
        except ValueError as e:
            result["error"] = str(e)
    elif scenario in ("dies", "leaves"):
        x, y = data()
        model, opt = make(0)
        if group.rank == 1:
            # leave after 3 batches: either die at once or return quietly
            original = model.backward
            calls = [0]

            def backward(g):
                calls[0] += 1
                if calls[0] == 4:
                    if scenario == "dies":
                        os._exit(3)
                    raise SystemExit(0)
                return original(g)
            model.backward = backward
        try:
            fit(model, CrossEntropyLoss(), opt, DataLoader(x, y, batch_size=8), epochs=1,
                progress=False, distributed=group)
        except distributed.DistributedError as e:
            with open(os.path.join(out, f"rank{group.rank}.json"), "w") as f:
                json.dump({"rank": group.rank, "error": str(e)}, f)
            raise
    elif scenario == "resume":
        ckpt = os.path.join(out, "ckpt.safetensors")
        run(group, batch=8, epochs=2, checkpoint=ckpt)
        resumed, hist = run(group, batch=8, epochs=3, checkpoint=ckpt, resume=True)
        straight, straight_hist = run(group, batch=8, epochs=3)
        result["resumed_equal"] = all(np.array_equal(a, b) for a, b in
                                      zip(resumed.state_dict().values(),
                                          straight.state_dict().values()))
        result["history_equal"] = hist.train_loss == straight_hist.train_loss
        result["epochs"] = hist.epoch
    else:
        raise SystemExit(f"unknown scenario {scenario}")

    with open(os.path.join(out, f"rank{group.rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
