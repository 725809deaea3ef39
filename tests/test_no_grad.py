"""convcore.no_grad(): forward passes that keep nothing for a backward, so an
inference holds only the values still to be read (PyTorch's torch.no_grad)."""
import threading
import tracemalloc

import numpy as np
import pytest

import convcore as cc
from convcore import nn


def _seeded(build):
    cc.manual_seed(0)
    return build()


def _peak_bytes(fn) -> int:
    """The most bytes (numpy's allocations included) held at once during fn()."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name,kwargs,size", [
    ("resnet18", {}, 64),            # ResNet's own forward, fused BN + ReLU
    ("googlenet", {}, 64),           # a Graph of inception branches
    ("densenet121", {}, 64),         # concatenations
    ("mobilenet_v2", {}, 64),
    ("nasnet_a_mobile", {}, 64),     # cells: Graphs with many joins
])
def test_outputs_are_the_same_bits(name, kwargs, size):
    model = _seeded(lambda: cc.models.get(name, **kwargs)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    y = model(x)
    with cc.no_grad():
        y_no_grad = model(x)
    np.testing.assert_array_equal(y_no_grad, y)


def _layers():
    return [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Linear(5, 3),
        nn.ReLU(),
        nn.SiLU(),
        nn.Softmax(dim=1),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.BatchNorm2d(3),
        nn.LocalResponseNorm(3),
        nn.Graph({"conv": nn.Conv2d(3, 3, 1)}, ["a = conv(x)", "y = add(a, x)"]),
    ]


@pytest.mark.parametrize("layer", _layers(), ids=lambda m: type(m).__name__)
def test_a_backward_after_a_no_grad_forward_raises(layer):
    x = np.random.default_rng(1).standard_normal(
        (2, 5) if isinstance(layer, nn.Linear) else (2, 3, 8, 8)).astype(np.float32)
    layer.train()
    y = layer(x)
    layer.backward(np.ones_like(y))  # with grad: fine
    with cc.no_grad():
        y = layer(x)
    with pytest.raises(RuntimeError, match=r"backward called before forward, or after a "
                                           r"forward under convcore\.no_grad\(\)"):
        layer.backward(np.ones_like(y))


def test_a_fused_batch_norm_after_no_grad_raises():
    bn = nn.BatchNorm2d(3)
    x = np.ones((2, 3, 4, 4), np.float32)
    with cc.no_grad():
        y = bn.forward_fused(x)
    with pytest.raises(RuntimeError, match="forward_fused under convcore.no_grad"):
        bn.backward_fused(np.ones_like(y))


def test_training_after_no_grad_works_again():
    model = _seeded(lambda: cc.models.get("resnet18")).train()
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with cc.no_grad():
        model(x)
    y = model(x)
    gx = model.backward(np.ones_like(y))
    assert gx.shape == x.shape and np.isfinite(gx).all()


def _chain(depth):
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(8, 8, 3, padding=1),
                                                             nn.ReLU())])


def _graph_chain(depth):
    modules = {f"c{i}": nn.Conv2d(8, 8, 3, padding=1) for i in range(depth)}
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(f"v{i} = c{i}({prev})")
        nodes.append(f"r{i} = relu(v{i})")
        prev = f"r{i}"
    return nn.Graph(modules, nodes)


@pytest.mark.parametrize("build", [_chain, _graph_chain], ids=["Sequential", "Graph"])
def test_an_inference_holds_only_the_values_still_to_be_read(build):
    # 24 layers of 1x8x64x64 float32 (128 KB each): with grad every input is
    # kept (3 MB and more); under no_grad a few at a time
    model = _seeded(lambda: build(12)).eval()
    x = np.ones((1, 8, 64, 64), np.float32)
    model(x)  # warm-up: the core's scratch
    one = x.nbytes
    keeping = _peak_bytes(lambda: model(x))
    with cc.no_grad():
        not_keeping = _peak_bytes(lambda: model(x))
    assert keeping > 20 * one
    assert not_keeping < 6 * one


def test_nests_and_decorates_and_is_per_thread():
    assert cc.is_grad_enabled()
    seen = {}

    @cc.no_grad()
    def inside():
        seen["decorated"] = cc.is_grad_enabled()
        t = threading.Thread(target=lambda: seen.setdefault("thread", cc.is_grad_enabled()))
        t.start()
        t.join()

    guard = cc.no_grad()
    with guard:
        with guard:
            inside()
            seen["nested"] = cc.is_grad_enabled()
        seen["outer"] = cc.is_grad_enabled()
    assert seen == dict(decorated=False, thread=True, nested=False, outer=False)
    assert cc.is_grad_enabled()


def test_one_decorated_function_in_two_threads_restores_each_threads_mode():
    # A (inside an outer no_grad) enters the decorated function, then B
    # (grad on) does, then A leaves: A must be back to no grad, B to grad
    b_entered, a_left = threading.Event(), threading.Event()
    seen = {}

    @cc.no_grad()
    def body(name):
        if name == "a":
            b_entered.wait(5)
        else:
            b_entered.set()
            a_left.wait(5)

    def a():
        with cc.no_grad():
            body("a")
            seen["a"] = cc.is_grad_enabled()
        a_left.set()

    def b():
        body("b")
        seen["b"] = cc.is_grad_enabled()

    ta = threading.Thread(target=a)
    ta.start()
    tb = threading.Thread(target=b)
    tb.start()
    ta.join()
    tb.join()
    assert seen == dict(a=False, b=True)


def test_predict_and_evaluate_keep_nothing():
    model = _seeded(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(2 * 6 * 6, 3)))
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8)).astype(np.float32)
    cc.predict(model, x)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.ones((4, 3), np.float32))
    loader = cc.data.DataLoader(x, np.arange(4) % 3, batch_size=2)
    cc.evaluate(model, loader)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.ones((2, 3), np.float32))
    assert cc.is_grad_enabled() and model.training
