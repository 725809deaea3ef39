"""The compiled engine (convcore.compile, csrc/runtime/engine.cpp) against
the eager model in eval mode: every zoo model, each fusion and the cases
where it must not happen, the blocked layout at every instruction-set cap,
and the engine against its own plain, unfused steps.

Tolerance: float32 results within 1e-5 of the output's scale (folding a
batch norm into a convolution's weights rounds differently from applying it
after); the plain, unfused engine runs the core's ops, bit for bit."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import convcore
import convcore.nn as nn
from convcore import _core, models

from test_lowering import randomize_batch_norm

# A stable record of the largest difference per model, printed by -rA runs
# and kept in docs/engine.md's table.
ERRORS = {}


def rel_diff(got, expected):
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def compiled_and_eager(model, shape, batch=2, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    model = randomize_batch_norm(model, rng).eval()
    x = rng.standard_normal((batch,) + tuple(shape)).astype(model.dtype)
    return convcore.compile(model, **kwargs), model, x


def engine(model, blocked=True, fuse=True):
    """The engine with its options (convcore.compile takes the defaults)."""
    from convcore.nn.lowering import to_graph
    return _core.CompiledNet(json.dumps(to_graph(model)), dict(model.state_dict()),
                             blocked=blocked, fuse=fuse)


# --------------------------------------------------------------------------- the zoo

ZOO_SMALL = {"lenet5": {}, "alexnet": dict(input_size=67), "zfnet": dict(input_size=67),
             "vgg16": dict(input_size=32), "googlenet": dict(aux_logits=True)}
SLOW = {"resnet34", "wide_resnet50_2", "vgg16", "zfnet"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in models._ZOO])
def test_zoo_model_compiled_equals_eager(name):
    convcore.manual_seed(0)
    kwargs = dict(num_classes=10)
    kwargs.update(ZOO_SMALL.get(name, {"input_size": 64}))
    model = models.get(name, **kwargs)
    compiled, model, x = compiled_and_eager(model, model.input_shape)
    expected = model(x)
    got = compiled(x)
    assert got.shape == expected.shape and got.dtype == np.float32
    ERRORS[name] = rel_diff(got, expected)
    assert ERRORS[name] <= 1e-5, f"{name}: {ERRORS[name]:.2e}"
    # the plain, unfused engine is the core's ops, bit for bit (on one
    # thread: with two, each runs a share of the batch, and the core's
    # algorithm for a layer may depend on the batch it sees)
    plain = engine(model, blocked=False, fuse=False)
    plain.threads = 1
    np.testing.assert_array_equal(plain.forward(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models._ZOO))
def test_zoo_model_at_full_size(name):
    convcore.manual_seed(0)
    model = models.get(name, num_classes=1000)
    compiled, model, x = compiled_and_eager(model, model.input_shape, batch=1)
    assert rel_diff(compiled(x), model(x)) <= 1e-5


def test_float64_model_runs_plain_and_matches():
    convcore.manual_seed(0)
    model = models.resnet18(num_classes=5, input_size=32).to(np.float64)
    compiled, model, x = compiled_and_eager(model, model.input_shape)
    assert compiled.dtype == np.float64
    assert rel_diff(compiled(x), model(x)) <= 1e-12
    assert "blocked" not in compiled.plan(2)


# --------------------------------------------------------------------------- fusions

def plan_steps(compiled, batch=2):
    lines = compiled.plan(batch).splitlines()
    return lines[0], [line.split("  ")[0].strip() for line in lines[2:]]


def test_batch_norm_activation_and_residual_fuse_into_the_convolution():
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.BasicBlock(8, 8), nn.Dropout(0.3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    compiled, model, x = compiled_and_eager(model, (3, 10, 10))
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    head, steps = plan_steps(compiled)
    assert "3 batch norms folded" in head
    assert steps[0] == "0 + 1 + ReLU"
    assert "3.conv1 + 3.bn1 + ReLU" in steps
    assert "3.conv2 + 3.bn2 + add + ReLU" in steps
    assert not any("Dropout" in s or s.startswith("4") for s in steps)  # the identity removed


def test_an_output_read_twice_is_not_fused_away():
    # the convolution's output feeds the batch norm and the add: no folding
    # (its unnormalised value is needed), no activation fused into the add's input
    convcore.manual_seed(0)
    model = nn.Graph({"conv": nn.Conv2d(4, 4, 3, padding=1), "bn": nn.BatchNorm2d(4),
                      "act": nn.ReLU6()},
                     ["c = conv(x)", "b = bn(c)", "s = add(b, c)", "y = act(s)"])
    compiled, model, x = compiled_and_eager(model, (4, 7, 7))
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    head, steps = plan_steps(compiled)
    assert "0 batch norms folded" in head
    assert "bn" in steps  # a scale-and-shift step of its own
    assert any(s.startswith("conv") and "bn" not in s for s in steps)


def test_a_repeated_activation_or_pooling_is_computed_once():
    """NASNet's branches each apply their own ReLU to a cell's input: an
    activation or pooling of a value that an earlier node computes alike is
    read from that node's output. Another activation, other pooling
    parameters or fuse=False keep their own steps."""
    convcore.manual_seed(0)
    model = nn.Graph({"c": nn.Conv2d(4, 8, 3, padding=1), "r1": nn.ReLU(), "r2": nn.ReLU(),
                      "r3": nn.ReLU6(), "p1": nn.MaxPool2d(3, 1, 1), "p2": nn.MaxPool2d(3, 1, 1),
                      "p3": nn.MaxPool2d(5, 1, 2), "a1": nn.AvgPool2d(3, 1, 1),
                      "a2": nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                      "d1": nn.Conv2d(8, 8, 3, padding=1, groups=8),
                      "d2": nn.Conv2d(8, 8, 3, padding=1, groups=8)},
                     ["c0 = c(x)", "u = r1(c0)", "v = r2(c0)", "w = r3(c0)",
                      "pu = p1(u)", "pv = p2(v)", "pw = p3(w)", "au = a1(u)", "av = a2(u)",
                      "du = d1(pu)", "dv = d2(pv)",
                      "s = add(du, dv)", "t = add(s, pw)", "q = add(au, av)", "y = add(t, q)"])
    compiled, model, x = compiled_and_eager(model, (4, 9, 9))
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    head, steps = plan_steps(compiled)
    assert "2 repeated activations and pools shared" in head, head
    assert "r2" not in " ".join(steps) and "p2" not in steps, steps
    # the ReLU6, the wider pool and the other average pool stay; both
    # depthwise layers (weights of their own) run on the one pooled value
    assert "p3" in steps and "a1" in steps and "a2" in steps and "d1" in steps and "d2" in steps
    unfused = engine(model, fuse=False)
    assert "0 repeated activations and pools shared" in unfused.plan(2, (4, 9, 9))
    assert rel_diff(unfused.forward(x), model(x)) <= 1e-5


def test_batch_norm_with_batch_statistics_is_not_folded():
    # track_running_stats=False normalises with the batch's statistics even in
    # eval mode (as PyTorch): it cannot be folded into the weights
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU())
    compiled, model, x = compiled_and_eager(model, (3, 8, 8), batch=3)
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    head, steps = plan_steps(compiled)
    assert "0 batch norms folded" in head and "1" in steps
    # nor split into chunks or shares of images, side by side or not: the
    # statistics are the whole batch's
    big = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                        nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1)).eval()
    xb = np.random.default_rng(1).standard_normal((5, 3, 224, 224)).astype(np.float32)
    for threads in (1, 2):
        assert rel_diff(convcore.compile(big, threads=threads)(xb), big(xb)) <= 1e-5


def test_a_model_in_training_mode_compiles_its_eval_computation_with_a_warning():
    convcore.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                                 np.random.default_rng(0))
    model.train()
    with pytest.warns(UserWarning, match="evaluation mode"):
        compiled = convcore.compile(model)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert model.training  # left as it was
    assert rel_diff(compiled(x), model.eval()(x)) <= 1e-5


def test_concatenation_branches_write_in_place():
    convcore.manual_seed(0)
    model = models.densenet121(num_classes=10, input_size=32)
    compiled, model, x = compiled_and_eager(model, model.input_shape)
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    head, steps = plan_steps(compiled)
    in_place = int(head.split(" concatenation inputs")[0].rsplit(", ", 1)[1])
    assert in_place >= 58  # every dense layer's output and each block's input


def test_concatenation_branches_inside_channel_blocks():
    # NASNet's branches of 11 and 22 channels: starts and ends inside a block
    # (copied lane by lane), whole-block branches in place, a ragged last one;
    # the 16 at channel 16 is whole blocks at both block sizes (8 and 16)
    from convcore.nn.graph import Graph
    convcore.manual_seed(0)
    widths = [3, 13, 16, 11, 8, 7]
    branches = {f"b{i}": nn.Sequential(nn.Conv2d(4, w, 3, padding=1), nn.ReLU())
                for i, w in enumerate(widths)}
    nodes = [f"y{i} = b{i}(x)" for i in range(len(widths))]
    nodes.append("c = concat(" + ", ".join(f"y{i}" for i in range(len(widths))) + ")")
    model = nn.Sequential(Graph(dict(branches, head=nn.Conv2d(sum(widths), 6, 1)),
                                nodes + ["out = head(c)"]))
    compiled, model, x = compiled_and_eager(model, (4, 7, 6), batch=3)
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    plan = compiled.plan(3)
    assert plan.count("reorder") == 1, plan  # to NCHW at the end only
    assert "1 concatenation inputs written in place" in plan  # the 16 at channel 16


def test_step_threads_follow_the_work():
    # the plan's last column: a large fully connected layer at batch 1 is
    # 16M multiply-adds and takes both threads; a small one runs on one
    model = nn.Sequential(nn.Flatten(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))
    compiled = convcore.compile(model.eval(), threads=2)
    plan = compiled.plan(1, input_shape=(4096, 1, 1))
    threads = [int(line.split()[-1]) for line in plan.splitlines()[2:]]
    assert threads == [2, 1], plan
    # a global pool counts the elements it reads: 256 x 56 x 56 takes both
    # threads (squeeze-and-excitation's pools), 256 x 4 x 4 one
    pool = nn.Sequential(nn.Conv2d(3, 256, 1), nn.AdaptiveAvgPool2d(1)).eval()
    for side, want in ((56, 2), (4, 1)):
        plan = convcore.compile(pool, threads=2).plan(1, input_shape=(3, side, side))
        line = next(line for line in plan.splitlines() if "globalpool" in line)
        assert int(line.split()[-1]) == want, plan


def test_large_batch_runs_in_chunks_of_images():
    # 16 + 16 channels at 224 x 224 is 6.4 MB an image for the second
    # convolution: a batch of 5 runs as chunks of 2, 2 and 1, each image's
    # result that of the image alone (the same plan as a batch of one)
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                          nn.Conv2d(16, 8, 1))
    compiled, model, x = compiled_and_eager(model, (3, 224, 224), batch=5, threads=1)
    y = compiled(x)
    assert "for a batch of 5 in chunks of 2 images" in compiled.plan(5)
    assert "chunks" not in compiled.plan(2)
    assert rel_diff(y, model(x)) <= 1e-5
    alone = np.concatenate([compiled(x[i:i + 1]) for i in range(5)])
    assert np.array_equal(y, alone)
    # a strided view is copied once, then chunked the same way
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not xt.flags.c_contiguous
    assert np.array_equal(compiled(xt), y)
    assert compiled.arena_bytes(5) == compiled.arena_bytes(2)
    # on two threads the chunks run side by side, one per thread and each on
    # one thread, with half the budget each: the same values
    two = convcore.compile(model, threads=2)
    assert np.array_equal(two(x), y)
    assert "for a batch of 5 in chunks of 1 image, 2 side by side" in two.plan(5)
    assert np.array_equal(two(xt), y)
    assert two.arena_bytes(5) == 2 * compiled.arena_bytes(1)
    assert "side by side" not in two.plan(1)


def test_small_classifiers_run_side_by_side():
    # LeNet-5's linear weights (236 kB) stay in each core's cache, so a
    # batch of 16 runs as two shares side by side; a classifier of 4 MB of
    # weights, many times the activations, keeps one team of two threads
    # (each share would stream the weights from memory again)
    lenet = convcore.compile(convcore.models.lenet5().eval(), threads=2)
    assert "2 side by side" in lenet.plan(16), lenet.plan(16)
    wide = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 300)).eval()
    plan = convcore.compile(wide, threads=2).plan(16, input_shape=(1, 32, 32))
    assert "side by side" not in plan, plan


def test_squeeze_and_excitation_and_every_activation():
    convcore.manual_seed(0)
    acts = [nn.ReLU6(), nn.Sigmoid(), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid()]
    for act in acts:
        se = nn.Graph({"pool": nn.AdaptiveAvgPool2d(1), "fc1": nn.Conv2d(16, 4, 1),
                       "fc2": nn.Conv2d(4, 16, 1), "gate": nn.Sigmoid(), "act": act},
                      ["p = pool(x)", "a = fc1(p)", "b = relu(a)", "c = fc2(b)", "g = gate(c)",
                       "y = mul(x, g)", "z = act(y)"])
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), se, nn.MaxPool2d(2),
                              nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False))
        compiled, model, x = compiled_and_eager(model, (3, 9, 9))
        assert rel_diff(compiled(x), model(x)) <= 1e-5, type(act).__name__


@pytest.mark.parametrize("cin,cout,groups,stride,dilation", [
    (96, 96, 6, 1, 1),     # 16 per group: panels of two blocks
    (64, 128, 2, 1, 2),    # 32 in, 64 out per group, dilated
    (36, 54, 3, 2, 1),     # 12 in, 18 out per group: groups across block edges, pad lanes
    (20, 40, 2, 1, 1),     # 10 in, 20 out per group
])
def test_grouped_convolutions_run_blocked(cin, cout, groups, stride, dilation):
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation,
                                    dilation=dilation, groups=groups),
                          nn.BatchNorm2d(cout), nn.ReLU(),
                          nn.Conv2d(cout, cout, 3, padding=1, groups=groups, bias=False))
    compiled, model, x = compiled_and_eager(model, (cin, 11, 9))
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    plan = compiled.plan(2)
    assert "conv(core)" not in plan and plan.count("reorder") == 2, plan


@pytest.mark.parametrize("cin,cout,groups,stride", [
    (128, 128, 32, 1),  # ResNeXt's 4 channels per group
    (64, 64, 8, 2),     # 8 per group, strided
    (12, 18, 3, 2),     # 4 in, 6 out per group
    (10, 20, 5, 1),     # 2 in, 4 out per group
])
def test_grouped_convolutions_with_few_channels_per_group_run_plain(cin, cout, groups, stride):
    """Up to 8 channels per group (in and out), the engine runs a grouped
    layer on the core's plain-layout op (its 'grouped' algorithm, plane by
    plane), between the blocked 1x1 layers around it."""
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.BatchNorm2d(cin), nn.ReLU(),
                          nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups),
                          nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, 16, 1))
    compiled, model, x = compiled_and_eager(model, (cin, 11, 9))
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    plan = compiled.plan(2)
    assert plan.count("conv(core)") == 1 and plan.count("reorder") >= 2, plan


def test_layers_that_stay_plain_and_their_reorders():
    # LRN, a padding mode and ceil-mode pooling run on the core's plain-layout
    # ops between blocked steps
    convcore.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convcore.build("CONV3-8-RELU-NORM-CONV3-8/g2-CONV3-8/p2-MAXPOOL3/s2/ceil-"
                               "CONV1-6-GAP-FC-5", (3, 15, 13))
    model.features[4].padding_mode = "reflect"
    compiled, model, x = compiled_and_eager(model, (3, 15, 13))
    assert rel_diff(compiled(x), model(x)) <= 1e-5
    plan = compiled.plan(2)
    assert "lrn" in plan and "conv(core)" in plan and "reorder" in plan


# --------------------------------------------------------------------------- the engine itself

def test_any_batch_size_and_repeated_calls_are_identical():
    convcore.manual_seed(0)
    model = models.mobilenet_v2(num_classes=10, input_size=32)
    compiled, model, x = compiled_and_eager(model, model.input_shape, batch=5)
    first = compiled(x)
    np.testing.assert_array_equal(compiled(x), first)  # the arena reused
    for n in (1, 3, 5):
        np.testing.assert_array_equal(compiled(x[:n]), first[:n])
    assert compiled(x[:0]).shape == (0, 10)
    # a strided batch (every other image) gives what its copy gives
    np.testing.assert_array_equal(compiled(x[::2]), compiled(np.ascontiguousarray(x[::2])))


def test_results_do_not_depend_on_the_thread_count():
    convcore.manual_seed(0)
    model = models.resnet18(num_classes=10, input_size=32)
    compiled, model, x = compiled_and_eager(model, model.input_shape, batch=3)
    one = convcore.compile(model, threads=1)
    assert one.threads == 1
    np.testing.assert_array_equal(one(x), compiled(x))
    one.threads = 2
    np.testing.assert_array_equal(one(x), compiled(x))


def _every_position_split_step():
    """A convolution, a depthwise one, Winograd, an unfolded batch norm, a
    squeeze-and-excitation gate, a residual add, a concatenation and both
    pools, on odd image sizes: every step that splits a small batch by
    positions."""
    convcore.manual_seed(0)
    se = nn.Graph({"pool": nn.AdaptiveAvgPool2d(1), "fc": nn.Conv2d(40, 40, 1), "gate": nn.Sigmoid()},
                  ["p = pool(x)", "q = fc(p)", "g = gate(q)", "y = mul(x, g)"])
    body = nn.Graph({"c1": nn.Conv2d(20, 40, 3, padding=1), "dw": nn.Conv2d(40, 40, 5, padding=2, groups=40),
                     "w3": nn.Conv2d(40, 40, 3, padding=1), "se": se, "bn": nn.BatchNorm2d(80),
                     "mp": nn.MaxPool2d(3, 2, padding=1), "ap": nn.AvgPool2d(2, ceil_mode=True)},
                    ["a0 = c1(x)", "a = relu(a0)", "b0 = dw(a)", "b = relu(b0)", "c = w3(b)",
                     "d = se(c)", "e = add(d, a)", "f = relu(e)", "g = concat(f, b)", "h0 = bn(g)",
                     "h = relu(h0)", "i = mp(h)", "y = ap(i)"])
    return nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), body)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_steps_split_by_positions_give_the_same_result_at_every_thread_count(batch):
    model = _every_position_split_step()
    # large enough that the elementwise steps take 3 threads (engine.cpp's grain)
    compiled, model, x = compiled_and_eager(model, (3, 61, 47), batch=batch, threads=1)
    one = compiled(x)
    assert rel_diff(one, model(x)) <= 1e-5
    for kind in ("depthwise", "winograd", "mul", "add", "scale+shift", "maxpool", "avgpool"):
        assert kind in compiled.summary(print_fn=None), kind
    for threads in (2, 3, 4):
        compiled.threads = threads
        np.testing.assert_array_equal(compiled(x), one)
    plan = compiled.summary(print_fn=None).splitlines()[2:]
    assert [int(line.split()[-1]) for line in plan if " add " in line] == [3], plan


def test_elementwise_steps_write_over_inputs_that_die_with_them():
    convcore.manual_seed(0)
    # a = conv(x) is read by the add alone, the add's output by the mul
    # alone: both write over their input, so the chain needs one buffer of
    # 16 x 8 x 8 blocked floats (4096 bytes, plus the pooled values) where
    # it needed two (8192: the session's start build)
    chain = nn.Graph({"conv": nn.Conv2d(3, 16, 3, padding=1), "pool": nn.AdaptiveAvgPool2d(1)},
                     ["a = conv(x)", "b = add(a, a)", "c = mul(b, b)", "y = pool(c)"])
    compiled, chain, x = compiled_and_eager(chain, (3, 8, 8), batch=1)
    np.testing.assert_allclose(compiled(x), chain(x), rtol=1e-6)
    text = compiled.summary(print_fn=None)
    values = int(text.split("(values ")[1].split(",")[0])
    assert 4096 <= values < 8192, text
    # an input read again later is not written over; nor is the caller's array
    keep = nn.Graph({"conv": nn.Conv2d(3, 16, 3, padding=1), "conv2": nn.Conv2d(16, 16, 1)},
                    ["a = conv(x)", "b = add(a, a)", "c = conv2(b)", "y = mul(c, a)"])
    compiled, keep, x = compiled_and_eager(keep, (3, 8, 8), batch=2)
    before = x.copy()
    np.testing.assert_allclose(compiled(x), keep(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x, before)


def test_summary_profile_and_arena():
    convcore.manual_seed(0)
    model = models.resnet18(num_classes=10, input_size=32)
    compiled, model, x = compiled_and_eager(model, model.input_shape)
    text = compiled.summary(batch=4, print_fn=None)
    assert "20 batch norms folded" in text and "arena" in text
    assert "conv1 + bn1 + ReLU" in text and "blocked" in text
    assert compiled.arena_bytes(16) > compiled.arena_bytes(1) > 0
    rows = compiled.profile(x, runs=2)
    assert rows[0]["step"] == "conv1 + bn1 + ReLU" and rows[0]["kind"] == "conv"
    assert all(r["seconds"] >= 0 for r in rows)


def test_a_saved_file_compiles_straight_from_the_c_reader(tmp_path):
    convcore.manual_seed(0)
    model = models.mobilenet_v2(num_classes=10, input_size=32)
    compiled, model, x = compiled_and_eager(model, model.input_shape)
    path = tmp_path / "m.safetensors"
    model.save(path)
    from_file = convcore.compile(path)
    assert from_file.input_shape == (3, 32, 32) and from_file.name == "mobilenet_v2"
    np.testing.assert_array_equal(from_file(x), compiled(x))
    with pytest.raises(FileNotFoundError):
        convcore.compile(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}")
    with pytest.raises(ValueError, match="cannot load .*bad header length 16"):
        convcore.compile(tmp_path / "bad.safetensors")


def test_a_file_compiled_for_several_batch_classes_and_shapes(tmp_path):
    """A net read from a file gives up the graph's copy of each weight it
    packs; a later compile (a wide batch, another image size) shares the
    packings whose algorithm stays and reads again from the file only the
    layers it packs anew (Winograd on the 7x7 images in a wide batch, the
    plain grouped layer's weights). Every compile matches the eager model."""
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(32, 16, 1))
    model = randomize_batch_norm(model, np.random.default_rng(0)).eval()
    path = tmp_path / "m.safetensors"
    model.save(path)
    from_file = convcore.compile(path, threads=2)
    rng = np.random.default_rng(1)
    for batch, side in ((1, 7), (16, 7), (3, 7), (2, 9), (16, 9), (1, 7), (17, 7)):
        x = rng.standard_normal((batch, 8, side, side)).astype(np.float32)
        assert rel_diff(from_file(x), model(x)) <= 1e-5, (batch, side)
    kinds = [[f for f in line.split("  ") if f.strip()][1].strip()
             for line in from_file.plan(16, (8, 7, 7)).splitlines()[2:]]
    assert kinds.count("winograd") == 1 and "conv(core)" in kinds, kinds


def test_bad_inputs_get_clear_errors():
    convcore.manual_seed(0)
    compiled = convcore.compile(models.lenet5().eval())
    with pytest.raises(ValueError, match=r"input must be a batch of shape \(N, 1, 32, 32\)"):
        compiled(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(TypeError, match="input has dtype float64 but the compiled model is float32"):
        compiled(np.zeros((2, 1, 32, 32)))
    with pytest.raises(TypeError, match="numpy array"):
        compiled([[1.0]])
    with pytest.raises(TypeError, match="convcore.nn.Module"):
        convcore.compile(42)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        convcore.compile(models.lenet5().eval(), threads=0)
    with pytest.raises(ValueError, match="runs must be a positive int"):
        compiled.profile(np.zeros((1, 1, 32, 32), np.float32), runs=0)

    class Doubler(nn.Module):
        def forward(self, x):
            return 2 * x

    with pytest.raises(TypeError, match="Doubler"):
        convcore.compile(nn.Sequential(nn.ReLU(), Doubler()).eval())


def pointwise_chain():
    """1x1 convolutions with a residual add and ReLU fused into each: 24 input
    channels (the kernel with the output stage in registers), 300 (the same
    with AVX-512, all taps at once; past one slice with AVX2: tiles through
    memory) and 1100 (past one slice with every instruction set)."""
    return nn.Graph({"a": nn.Conv2d(24, 24, 1), "b": nn.Conv2d(24, 300, 1),
                     "c": nn.Conv2d(300, 1100, 1), "d": nn.Conv2d(1100, 24, 1),
                     "r1": nn.ReLU(), "r2": nn.ReLU(), "r3": nn.ReLU(), "r4": nn.ReLU()},
                    ["p = a(x)", "s = add(p, x)", "t = r1(s)", "u = b(t)", "v = r2(u)",
                     "w = c(v)", "w4 = r4(w)", "z = d(w4)", "z2 = add(z, t)", "y = r3(z2)"])


def pointwise_one_slice_chain():
    """1x1 convolutions of 129 to 256 input channels (one slice of taps:
    all at once with AVX-512, in two chunks of the gather kernel with AVX2),
    with a residual add: 200 and 136 channels (whole blocks of 8), 250
    (not)."""
    return nn.Graph({"a": nn.Conv2d(24, 200, 1), "b": nn.Conv2d(200, 136, 1),
                     "c": nn.Conv2d(136, 250, 1), "d": nn.Conv2d(250, 136, 1),
                     "r1": nn.ReLU(), "r2": nn.ReLU6(), "r3": nn.ReLU()},
                    ["p = a(x)", "q = r1(p)", "u = b(q)", "v = r2(u)", "w = c(v)",
                     "z = d(w)", "z2 = add(z, u)", "y = r3(z2)"])


def pointwise_blocks_chain():
    """1x1 convolutions whose input channels fill whole channel blocks (16
    with AVX-512, 8 with AVX2: the pointwise kernel that reads taps block by
    block): 32 with a residual add, 512 read at stride 2 (a subsampled
    frame), 64 with padding (a zero-padded frame), 48, and a grouped 1x1
    (the general kernel)."""
    return nn.Graph({"a": nn.Conv2d(32, 32, 1), "b": nn.Conv2d(32, 512, 1),
                     "c": nn.Conv2d(512, 64, 1, stride=2), "d": nn.Conv2d(64, 48, 1, padding=1),
                     "e": nn.Conv2d(48, 80, 1), "f": nn.Conv2d(80, 96, 1, groups=2),
                     "r1": nn.ReLU(), "r2": nn.ReLU(), "r3": nn.ReLU6(), "r4": nn.ReLU()},
                    ["p = a(x)", "s = add(p, x)", "t = r1(s)", "u = b(t)", "v = r2(u)",
                     "w = c(v)", "w2 = d(w)", "w3 = r3(w2)", "z = e(w3)", "z2 = r4(z)",
                     "y = f(z2)"])


@pytest.mark.parametrize("side", [5, 7, 13, 14, 27])
def test_pointwise_layers_in_whole_channel_blocks(side):
    convcore.manual_seed(0)
    compiled, model, x = compiled_and_eager(pointwise_blocks_chain(), (32, side, side), batch=3)
    got = compiled(x)
    assert rel_diff(got, model(x)) <= 1e-5
    for i in range(3):  # tiles of one image
        assert np.array_equal(compiled(x[i:i + 1]), got[i:i + 1])
    for threads in (1, 3):  # each position's sums in one tile: the same bits
        assert np.array_equal(convcore.compile(model, threads=threads)(x), got), threads
    head, steps = plan_steps(compiled)
    assert "b + ReLU" in steps and "a + add + ReLU" in steps, steps


def test_winograd_band_of_thirteen_tiles():
    # a 28x28 output is 49 F(4x4) tiles; with filters this small, bands of
    # 12 and a last of 1 (test_winograd_products_end_in_blocks_of_every_row_count
    # runs bands that end in 13 rows)
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 40, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(40, 32, 3, padding=1))
    compiled, model, x = compiled_and_eager(model, (32, 28, 28), batch=2)
    got = compiled(x)
    kinds = [[f for f in line.split("  ") if f.strip()][1].strip()
             for line in compiled.plan(2).splitlines()[2:]]
    assert [k for k in kinds if k != "reorder"] == ["winograd"] * 2, kinds
    assert rel_diff(got, model(x)) <= 1e-5
    assert rel_diff(compiled(x[1:]), got[1:]) <= 1e-6


def winograd_tails_chain():
    """Two F(2x2) layers of a blocked input: 40 -> 48 (a second panel of 16
    output channels) and 48 -> 36 (of 4: one vector of columns)."""
    return nn.Sequential(nn.Conv2d(24, 40, 1), nn.ReLU(), nn.Conv2d(40, 48, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(48, 36, 3, padding=1))


# (height, width, batch) whose bands of tiles, on 2 threads, end in blocks of
# every row count from 1 to 13 (AVX-512's blocks of 12, and of 13 for the
# last) and from 1 to 5 (AVX2's blocks of 6)
WINOGRAD_TAIL_SHAPES = [(17, 21, 2), (8, 8, 1), (9, 13, 1), (9, 17, 1), (9, 9, 1), (9, 11, 1),
                        (9, 19, 1), (9, 21, 1), (13, 17, 1), (9, 25, 1), (9, 27, 1)]


@pytest.mark.parametrize("height, width, batch", WINOGRAD_TAIL_SHAPES)
def test_winograd_products_end_in_blocks_of_every_row_count(height, width, batch):
    # the products read a point's tiles in place, rows cin_pad apart
    # (gemm::strided_rows_kernel); a band's last block has exactly its rows
    convcore.manual_seed(0)
    compiled, model, x = compiled_and_eager(winograd_tails_chain(), (24, height, width),
                                            batch=batch, threads=2)
    got = compiled(x)
    kinds = [[f for f in line.split("  ") if f.strip()][1].strip()
             for line in compiled.plan(batch).splitlines()[2:]]
    assert kinds.count("winograd") == 2, kinds
    assert rel_diff(got, model(x)) <= 1e-5
    for threads in (1, 3):  # other bands, the same products per tile
        assert rel_diff(convcore.compile(model, threads=threads)(x), got) <= 1e-6, threads


@pytest.mark.parametrize("cin, cout, side, batch", [(1024, 512, 13, 3), (512, 512, 28, 3),
                                                   (1024, 1024, 7, 17)])
def test_winograd_filters_larger_than_the_l3(cin, cout, side, batch):
    # F(2x2) of 1024 x 512 channels and F(4x4) of 512 x 512 are over 24 MB:
    # a band holds two images' 49 tiles (three images: a band of two and
    # one of one), its output panels shared by the threads, each group
    # transforming the input again; 7x7 outputs (F(2x2) in a wide batch),
    # six images' 16 tiles a band (17 images: 6, 6 and 5)
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())
    compiled, model, x = compiled_and_eager(model, (cin, side, side), batch=batch)
    got = compiled(x)
    assert "winograd" in compiled.plan(batch)
    assert rel_diff(got, model(x)) <= 1e-5
    if batch <= 3:
        for i in range(batch):  # an image alone: a band of one
            assert rel_diff(compiled(x[i:i + 1]), got[i:i + 1]) <= 1e-6


@pytest.mark.parametrize("side", [5, 7, 11, 13, 14])
def test_pointwise_tiles_of_one_row_more_than_the_kernel_block(side):
    # 25, 49 and 169 positions leave 13 for the last tile, which the AVX-512
    # kernels run as one block of 13 rows: the same sums as blocks of 12 and
    # 4. With AVX-512, 121 and 196 positions (an image split in two) go as
    # tiles of 12 and 13 rows throughout, none shorter.
    convcore.manual_seed(0)
    compiled, model, x = compiled_and_eager(pointwise_chain(), (24, side, side), batch=3)
    got = compiled(x)
    assert rel_diff(got, model(x)) <= 1e-5
    for i in range(3):  # an image alone: tiles of one image, its 13 rows at the end
        assert rel_diff(compiled(x[i:i + 1]), got[i:i + 1]) <= 1e-6
    head, steps = plan_steps(compiled)
    assert "b + ReLU" in steps and "d + add + ReLU" in steps, steps


@pytest.mark.parametrize("stride, side", [(2, 9), ((2, 3), 11), (3, 16)])
def test_strided_pointwise_reads_a_subsampled_frame(stride, side):
    # a strided 1x1 convolution of a blocked input runs on a copy of the
    # positions it reads; the next convolution adds its output (a
    # downsampling block) and is written over it
    convcore.manual_seed(0)
    model = nn.Graph({"a": nn.Conv2d(20, 40, 1), "r": nn.ReLU(),
                      "down": nn.Conv2d(40, 72, 1, stride=stride),
                      "main": nn.Conv2d(40, 72, 3, stride=stride, padding=1),
                      "out": nn.ReLU()},
                     ["q = a(x)", "p = r(q)", "d = down(p)", "m = main(p)", "s = add(m, d)",
                      "y = out(s)"])
    compiled, model, x = compiled_and_eager(model, (20, side, side + 2), batch=3)
    got = compiled(x)
    assert rel_diff(got, model(x)) <= 1e-5
    for i in range(3):
        assert rel_diff(compiled(x[i:i + 1]), got[i:i + 1]) <= 1e-6


def test_convolution_writes_over_its_residual_only_where_nothing_reads_it_later():
    # 1x1 convolutions (no padded frame: they read their input in place)
    # with residual adds: c2 writes over b, which dies with it; c1 not over
    # its own input p (other tiles still read the positions written), c3 not
    # over b2, which a later add reads
    convcore.manual_seed(0)
    model = nn.Graph({"a": nn.Conv2d(20, 40, 1), "r": nn.ReLU(), "c1": nn.Conv2d(40, 40, 1),
                      "cb": nn.Conv2d(40, 40, 1), "c2": nn.Conv2d(40, 40, 1),
                      "cb2": nn.Conv2d(40, 40, 1), "c3": nn.Conv2d(40, 40, 1),
                      "out": nn.ReLU()},
                     ["q = a(x)", "p = r(q)", "u = c1(p)", "v = add(u, p)", "b = cb(v)",
                      "w = c2(v)", "z = add(w, b)", "b2 = cb2(z)", "t = c3(z)",
                      "s = add(t, b2)", "s2 = add(s, b2)", "y = out(s2)"])
    compiled, model, x = compiled_and_eager(model, (20, 13, 11), batch=3)
    got = compiled(x)
    assert rel_diff(got, model(x)) <= 1e-5
    for i in range(3):
        assert rel_diff(compiled(x[i:i + 1]), got[i:i + 1]) <= 1e-6
    head, steps = plan_steps(compiled, batch=3)
    assert {"c1 + add", "c2 + add", "c3 + add"} <= set(steps), steps


@pytest.mark.parametrize("side, kernel, stride, dilation",
                         [(7, 3, 1, 1), (7, 5, 1, 1), (13, 3, 2, 1), (14, 5, 2, 1), (9, 3, 1, 1),
                          (11, 3, 1, 2), (12, 3, 2, 2)])
def test_depthwise_on_small_images_pads_a_frame_per_band(side, kernel, stride, dilation):
    # under 16 output columns a task copies the rows its band of output rows
    # reads into a frame whose padding it zeroes (only the padding: the rows
    # copied fill the rest); batch 1 on several threads splits each plane
    # into bands of rows, down to one row a band
    convcore.manual_seed(0)
    pad = dilation * (kernel // 2)
    model = nn.Sequential(nn.Conv2d(24, 40, 1), nn.ReLU(),
                          nn.Conv2d(40, 40, kernel, stride=stride, padding=pad,
                                    dilation=dilation, groups=40),
                          nn.ReLU(), nn.Conv2d(40, 40, kernel, padding=pad, dilation=dilation,
                                               groups=40))
    model = randomize_batch_norm(model, np.random.default_rng(0)).eval()
    x = np.random.default_rng(1).standard_normal((3, 24, side, side)).astype(np.float32)
    want = model(x)
    for threads in (1, 2, 5, 16):
        compiled = convcore.compile(model, threads=threads)
        assert rel_diff(compiled(x), want) <= 1e-5, threads
        assert rel_diff(compiled(x[1:2]), want[1:2]) <= 1e-5, threads
    kinds = [[f for f in line.split("  ") if f.strip()][1].strip()
             for line in compiled.plan(3).splitlines()[2:]]
    assert kinds.count("depthwise") == 2, kinds


# --------------------------------------------------------------------------- instruction sets

ISA_SCRIPT = r"""
import json, sys
import numpy as np
import convcore
from convcore import _core, models
sys.path.insert(0, sys.argv[1])
from test_lowering import randomize_batch_norm
out = {"isa": _core.gemm_isa(), "errors": {}}
for name, kw in [("mobilenet_v2", {}), ("resnet18", {}), ("densenet121", {}),
                 ("efficientnet_b0", {}), ("resnext50_32x4d", {}), ("nasnet_a_mobile", {})]:
    convcore.manual_seed(0)
    m = randomize_batch_norm(models.get(name, num_classes=10, input_size=32),
                             np.random.default_rng(0)).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    e = m(x)
    out["errors"][name] = float(np.abs(convcore.compile(m)(x) - e).max() / max(1, np.abs(e).max()))
from test_compiled import (pointwise_chain, pointwise_blocks_chain, pointwise_one_slice_chain,
                           winograd_tails_chain, WINOGRAD_TAIL_SHAPES)
for side in (7, 13, 14):  # tiles of 13 rows (AVX-512's blocks of 12)
    for chain, cin in ((pointwise_chain, 24), (pointwise_blocks_chain, 32),
                       (pointwise_one_slice_chain, 24)):
        for n in (1, 2):
            convcore.manual_seed(0)
            m = chain().eval()
            x = np.random.default_rng(2).standard_normal((n, cin, side, side)).astype(np.float32)
            e = m(x)
            out["errors"][f"{chain.__name__} {side}x{side} batch {n}"] = float(
                np.abs(convcore.compile(m, threads=2)(x) - e).max() / max(1, np.abs(e).max()))
for h, w, n in WINOGRAD_TAIL_SHAPES:  # the Winograd products' last blocks
    convcore.manual_seed(0)
    m = winograd_tails_chain().eval()
    x = np.random.default_rng(3).standard_normal((n, 24, h, w)).astype(np.float32)
    e = m(x)
    out["errors"][f"winograd {h}x{w} batch {n}"] = float(
        np.abs(convcore.compile(m, threads=2)(x) - e).max() / max(1, np.abs(e).max()))
print(json.dumps(out))
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_blocked_layout_at_every_instruction_set_cap(isa):
    env = dict(os.environ, CONVCORE_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", ISA_SCRIPT, here], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if isa == "avx512" and out["isa"] != "avx512":
        pytest.skip(f"no AVX-512 on this machine (the kernels ran as {out['isa']})")
    assert out["isa"] == isa or isa == "avx512"
    for name, err in out["errors"].items():
        assert err <= 1e-5, f"{name} at {isa}: {err:.2e}"


@pytest.mark.parametrize("kernel, stride, padding, dilation",
                         [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 2), (3, 2, 0, 1)])
def test_blocked_max_pool_nan_inf_and_ties_as_eager(kernel, stride, padding, dilation):
    # NaN wins, +-inf and ties (-0 before +0) as PyTorch's max pooling: the
    # blocked kernel tracks NaNs apart from its running max
    m = nn.Sequential(nn.Conv2d(3, 20, 1, bias=False),
                      nn.MaxPool2d(kernel, stride, padding, dilation=dilation)).eval()
    w = np.zeros((20, 3, 1, 1), np.float32)
    w[:, 0, 0, 0] = np.where(np.arange(20) % 2 == 0, 1.0, -1.0)  # copies of channel 0, signed
    m[0].weight.data[...] = w
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, (2, 3, 11, 13)).astype(np.float32)  # many ties
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 4, 7] = np.inf
    x[1, 0, 6, 2] = -np.inf
    x[1, 0, 3, 3:6] = -0.0
    x[1, 0, 9, 9] = np.nan
    eager = m(x)
    got = convcore.compile(m)(x)
    assert np.isnan(eager).any() and np.isinf(eager).any()
    np.testing.assert_array_equal(got, eager)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(eager))


@pytest.mark.parametrize("cin, cout, kernel, stride, padding, dilation, width, act", [
    (1, 6, 5, 1, 0, 1, 32, nn.ReLU),        # LeNet's first layer
    (3, 4, 3, (2, 1), 1, 1, 19, nn.SiLU),   # row stride only; padding copied into a frame
    (2, 8, 3, 1, (0, 2), 2, 16, None),      # dilation; a row exactly one vector wide
    (1, 3, (1, 4), 1, 0, 1, 40, nn.Sigmoid),  # padding lanes hold the activation of 0
    (3, 16, 3, 1, 1, 1, 20, nn.ReLU6),      # a full block (AVX-512; AVX2 takes gather_store)
])
def test_first_layer_with_few_output_channels(cin, cout, kernel, stride, padding, dilation,
                                              width, act):
    # lanes_row: output positions along the lanes for plain-input layers
    # with at most one block of output channels
    layers = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation)]
    if act is not None:
        layers.append(act())
    layers.append(nn.Conv2d(cout, 5, 1))  # a blocked consumer, reading every lane
    m = nn.Sequential(*layers).eval()
    rng = np.random.default_rng(5)
    for prm in m.parameters():
        prm.data[...] = rng.standard_normal(prm.data.shape).astype(np.float32)
    x = rng.standard_normal((3, cin, 13, width)).astype(np.float32)
    assert rel_diff(convcore.compile(m)(x), m(x)) <= 1e-5
    assert rel_diff(convcore.compile(m, threads=2)(x[1:2]), m(x[1:2])) <= 1e-5


# ------------------------------------------------------------ batch-dependent plans

def test_winograd_on_small_images_only_in_a_wide_batch():
    """A 3x3 convolution with a 2x2 to 7x7 output takes the direct kernel
    for small batches and F(2x2) Winograd from 16 images on (winograd_m:
    the engine compiles such a net once per batch class); a 14x14 one takes
    F(2x2) at every batch. Both variants match the eager model, and a batch
    of one image gives the same result in both."""
    convcore.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1))
    for side, small_kind in ((7, "conv"), (5, "conv"), (2, "conv"), (14, "winograd")):
        compiled, model, x = compiled_and_eager(model, (32, side, side), batch=16)
        kinds = {b: [k for k in ([f for f in line.split("  ") if f.strip()][1].strip()
                                 for line in compiled.plan(b, x.shape[1:]).splitlines()[2:])
                     if k != "reorder"]
                 for b in (1, 15, 16, 40)}
        assert kinds[1][:2] == kinds[15][:2] == [small_kind] * 2, kinds
        assert kinds[16][:2] == kinds[40][:2] == ["winograd"] * 2, kinds
        wide = compiled(x)
        assert rel_diff(wide, model(x)) <= 1e-5
        for i in (0, 15):  # the small-batch variant, image by image
            one = compiled(x[i:i + 1])
            assert rel_diff(one, model(x[i:i + 1])) <= 1e-5
            assert rel_diff(one, wide[i:i + 1]) <= 1e-5
