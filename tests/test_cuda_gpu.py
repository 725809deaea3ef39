"""The GPU path end to end: convcore's layers, optimisers, loss and
training on device arrays, checked against the CPU path (each op on its
own: test_ops.py, on every backend).

Each test runs on the two GPU backends of the `gpu_device` fixture
(_backends_fixture.py):
- "gpu": real CuPy on a real GPU (marker `gpu`; skipped, with the reason,
  where CuPy or a GPU is missing);
- "shim": a stand-in cupy module (tests/cuda_shim/fake_cupy.py) whose
  kernels run on the CUDA-execution shim, so the same Python GPU path
  (dispatch, compile cache, launches, Module.to, optimisers) is exercised on
  every machine with g++.
"""
import types

import numpy as np
import pytest

import convcore as cc
import convcore.cuda as cc_cuda
from _helpers import assert_close

from cuda_shim import fake_cupy


@pytest.fixture
def dev(gpu_device):
    """The shim, then a GPU (a Backend: xp, put, host, real)."""
    return gpu_device


def rnd(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def check(dev, actual, expected, what=""):
    assert type(actual).__module__.split(".")[0] == "cupy", f"{what}: {type(actual)} is not a device array"
    assert_close(dev.host(actual), expected, np.float32, what=what)


def test_fused_bias_relu_epilogues(dev):
    import convcore.cuda.functional as G
    x, w, b = rnd(2, 3, 8, 8), rnd(4, 3, 3, 3), rnd(4)
    check(dev, G.conv2d_relu(dev.put(x), dev.put(w), dev.put(b), padding=1),
          cc.relu(cc.conv2d(x, w, b, padding=1)))
    x, w, b = rnd(5, 9), rnd(6, 9), rnd(6)
    check(dev, G.linear_relu(dev.put(x), dev.put(w), dev.put(b)), cc.relu(cc.linear(x, w, b)))


def test_conv_backward_is_deterministic_on_device(dev, monkeypatch):
    import convcore.cuda.functional as G
    monkeypatch.setattr(G, "GRAD_WEIGHT_MIN_CHUNK", 16)  # force the split reduction
    x, w = rnd(2, 8, 12, 12), rnd(16, 8, 3, 3)
    gy = rnd(2, 16, 12, 12)
    args = [dev.put(a) for a in (gy, x, w)]
    first = [dev.host(a) for a in cc.conv2d_backward(*args, padding=1)]
    second = [dev.host(a) for a in cc.conv2d_backward(*args, padding=1)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    expected = cc.conv2d_backward(gy, x, w, padding=1)
    fast = G.conv2d_backward(*args, padding=1, deterministic=False)
    for a, e in zip(fast, expected):
        check(dev, a, e, "deterministic=False")


def test_kernels_compile_once_per_device(dev):
    x, w = dev.put(rnd(1, 3, 6, 6)), dev.put(rnd(4, 3, 3, 3))
    cc.conv2d(x, w)
    be = cc_cuda.backend()
    modules = dict(be._modules)
    assert (0, "conv.cu") in modules or any(k[1] == "conv.cu" for k in modules)
    cc.conv2d(x, w)
    cc.conv2d_backward(cc.conv2d(x, w), x, w)
    assert {k: v for k, v in be._modules.items() if k in modules} == modules
    times = cc_cuda.compile_seconds()
    assert any(k[1] == "conv.cu" for k in times) and all(t >= 0 for t in times.values())


def test_mixing_host_and_device_arrays_is_a_clear_error(dev):
    with pytest.raises(TypeError, match="weight is a numpy array"):
        cc.conv2d(dev.put(rnd(1, 3, 6, 6)), rnd(4, 3, 3, 3))
    with pytest.raises(TypeError, match="input must be float32 on the GPU"):
        cc.relu(dev.xp.asarray(np.ones(3, np.float64)))


def _net():
    cc.manual_seed(3)
    return cc.nn.Sequential(
        # no bias before BatchNorm: its gradient is ~0, pure rounding, which
        # Adam's normalisation would blow up into a meaningless comparison
        cc.nn.Conv2d(3, 8, 3, padding=1, bias=False), cc.nn.BatchNorm2d(8), cc.nn.ReLU(),
        cc.nn.MaxPool2d(2), cc.nn.Conv2d(8, 8, 3, groups=8, padding=1),
        cc.nn.LocalResponseNorm(3), cc.nn.AdaptiveAvgPool2d(2), cc.nn.Flatten(),
        cc.nn.Linear(32, 10))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_steps_on_device_match_cpu(dev, optimizer):
    x, t = rnd(4, 3, 8, 8), np.array([1, 0, 9, 3])
    cpu, gpu = _net(), _net().to("cuda")
    assert all(type(p.data).__module__.startswith("cupy") for p in gpu.parameters())

    def make(model):
        if optimizer == "sgd":
            return cc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return cc.optim.Adam(model.parameters(), lr=0.01)

    losses = []
    for model, xin in ((cpu, x), (gpu, dev.put(x))):
        opt, loss_fn = make(model), cc.nn.CrossEntropyLoss(label_smoothing=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss = loss_fn(model(xin), t)
            model.backward(loss_fn.backward())
            opt.step()
        losses.append(float(loss))
    assert_close(losses[1], losses[0], np.float32, rtol=1e-4)
    gpu_state = gpu.state_dict()  # host copies
    for key, value in cpu.state_dict().items():
        assert isinstance(gpu_state[key], np.ndarray)
        assert_close(gpu_state[key], value, np.float32, rtol=1e-3, what=key)
    gpu.to("cpu")
    assert all(isinstance(p.data, np.ndarray) and type(p.data).__module__ == "numpy"
               for p in gpu.parameters())
    assert_close(gpu(x), cpu(x), np.float32, rtol=1e-3)


def test_cross_entropy_loss_options_the_kernel_lacks_say_so(dev):
    """The layer hands its options to the GPU kernel (its results for those
    the kernel has: test_ops.py); the others say they are CPU-only."""
    z, t = rnd(4, 10, seed=7), np.array([1, 0, 9, 3])
    with pytest.raises(NotImplementedError, match="weight"):
        cc.nn.CrossEntropyLoss(weight=dev.put(np.ones(10, np.float32)))(dev.put(z), t)
    with pytest.raises(NotImplementedError, match="reduction='none'"):
        cc.nn.CrossEntropyLoss(reduction="none")(dev.put(z), t)


def test_fit_evaluate_predict_on_device_match_cpu(dev):
    """fit() moves each numpy batch to the model's device; the figures and the
    trained weights match a CPU run."""
    x = rnd(12, 3, 8, 8, seed=5)
    y = np.arange(12) % 10
    runs = []
    for device in ("cpu", "cuda"):
        model = _net()
        if device == "cuda":
            model.to("cuda")
        opt = cc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        hist = cc.fit(model, cc.nn.CrossEntropyLoss(), opt,
                      cc.data.DataLoader(x, y, batch_size=4, shuffle=True, seed=0),
                      cc.data.DataLoader(x, y, batch_size=6), epochs=2, progress=False)
        runs.append((model, hist, cc.predict(model, x, batch_size=5)))
    (cpu, cpu_hist, cpu_pred), (gpu, gpu_hist, gpu_pred) = runs
    assert_close(np.array(gpu_hist.train_loss), np.array(cpu_hist.train_loss), np.float32,
                 rtol=1e-4)
    assert gpu_hist.val_acc == cpu_hist.val_acc
    assert isinstance(gpu_pred, np.ndarray)
    assert_close(gpu_pred, cpu_pred, np.float32, rtol=1e-3)
    for key, value in cpu.state_dict().items():
        assert_close(gpu.state_dict()[key], value, np.float32, rtol=1e-3, what=key)


def test_to_cuda_refuses_float64(dev):
    with pytest.raises(TypeError, match="float32 model"):
        _net().to(np.float64).to("cuda")


@pytest.mark.gpu
def test_torch_cuda_tensors_in_and_dlpack_out():
    ok, why = cc_cuda.availability()
    if not ok:
        pytest.skip(f"no GPU: {why}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    w = torch.randn(4, 3, 3, 3, device="cuda")
    y = cc.conv2d(x, w, None, padding=1)  # zero-copy in (DLPack / __cuda_array_interface__)
    y_t = torch.from_dlpack(cc_cuda.to_dlpack(y))  # zero-copy out
    torch.backends.cudnn.allow_tf32 = False
    expected = torch.nn.functional.conv2d(x, w, padding=1)
    assert torch.allclose(y_t, expected, atol=1e-4, rtol=1e-4)


def test_sequential_fuses_conv_and_linear_with_relu(dev):
    cc.manual_seed(5)
    net = cc.nn.Sequential(cc.nn.Conv2d(3, 6, 3, padding="same"), cc.nn.ReLU(), cc.nn.Flatten(),
                           cc.nn.Linear(6 * 25, 7), cc.nn.ReLU(), cc.nn.Linear(7, 3))
    x = rnd(2, 3, 5, 5)
    gy = rnd(2, 3, seed=9)
    expected = net(x)
    expected_gx = net.backward(gy)
    expected_grads = [p.grad.copy() for p in net.parameters()]
    net.zero_grad()
    net.to("cuda")
    relu_before = None if dev.real else fake_cupy._Function.backend.launches["relu_fwd"]
    y = net(dev.put(x))
    if not dev.real:  # both ReLUs ran inside the GEMM epilogues
        assert fake_cupy._Function.backend.launches["relu_fwd"] == relu_before
    check(dev, y, expected, "output")
    check(dev, net.backward(dev.put(gy)), expected_gx, "grad_input")
    for p, e in zip(net.parameters(), expected_grads):
        check(dev, p.grad, e, "parameter gradient")


def test_gpu_benchmark_runs(dev, monkeypatch):
    """The benchmark's code path on tiny layers (on the shim its times mean
    nothing; on a GPU this is a smoke run of python -m convcore bench --gpu)."""
    from convcore import bench as cpu_bench
    from convcore.bench import gpu as gpu_bench
    if not dev.real:
        monkeypatch.setattr(gpu_bench, "_torch_cuda", lambda: None)  # no CUDA torch here
    lines = []
    result = gpu_bench.run(repeat=2, out=lines.append, cases=[
        cpu_bench.Conv("tiny.conv", 2, 3, 9, 5, 3, 1, 1), cpu_bench.Pool("tiny.pool", 2, 3, 9, 3, 2),
        cpu_bench.Fc("tiny.fc", 2, 20, 7)])
    assert [(r["layer"], r["direction"]) for r in result["rows"]] == [
        ("tiny.conv", "fwd"), ("tiny.conv", "bwd"), ("tiny.pool", "fwd"), ("tiny.fc", "fwd"),
        ("tiny.fc", "bwd")]
    assert all(r["convcore_ms"] > 0 for r in result["rows"])
    assert any(k.startswith("conv.cu@") for k in result["compile_seconds"])
    assert any("first-call compile" in line for line in lines)


def test_fusion_is_a_pass_of_to_cuda(dev):
    """Module.to("cuda") gives every Sequential the GPU's fused runner (nn
    itself imports no GPU code); a slice of it keeps the runner, and
    to("cpu") runs each module in turn again."""
    cc.manual_seed(6)
    net = cc.nn.Sequential(cc.nn.Conv2d(3, 6, 3, padding=1), cc.nn.ReLU(), cc.nn.Flatten(),
                           cc.nn.Linear(6 * 25, 4))
    x = rnd(2, 3, 5, 5)
    expected, expected_head = net(x), net[0:2](x)
    net.to("cuda")
    relu_before = None if dev.real else fake_cupy._Function.backend.launches["relu_fwd"]
    check(dev, net[0:2](dev.put(x)), expected_head, "slice output")
    if not dev.real:  # the slice's ReLU ran inside the convolution's epilogue
        assert fake_cupy._Function.backend.launches["relu_fwd"] == relu_before
    net.to("cpu")
    assert_close(net(x), expected, np.float32)


@pytest.mark.parametrize("training", [True, False])
def test_residual_net_and_remaining_layers_on_device(dev, training):
    """BasicBlock / Bottleneck (projection shortcuts), AvgPool2d, Dropout
    (eval), Identity: forward and backward match the CPU."""
    def net():
        cc.manual_seed(11)
        proj = cc.nn.Sequential(cc.nn.Conv2d(8, 16, 1, stride=2, bias=False), cc.nn.BatchNorm2d(16))
        return cc.nn.Sequential(
            cc.nn.Conv2d(3, 8, 3, padding=1), cc.nn.AvgPool2d(2, stride=1, padding=1,
                                                              count_include_pad=False),
            cc.nn.BasicBlock(8, 16, stride=2, downsample=proj),
            cc.nn.Bottleneck(16, 4), cc.nn.Dropout(0.5), cc.nn.Identity(),
            cc.nn.AdaptiveAvgPool2d(1), cc.nn.Flatten(), cc.nn.Linear(16, 5))
    x, gy = rnd(2, 3, 7, 7), rnd(2, 5, seed=3)
    cpu, gpu = net().train(training), net().train(training).to("cuda")
    if training:  # Dropout's random mask: compare the deterministic rest
        cpu[4].p = gpu[4].p = 0.0
    check(dev, gpu(dev.put(x)), cpu(x), "output")
    check(dev, gpu.backward(dev.put(gy)), cpu.backward(gy), "grad_input")
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        check(dev, p.grad, q.grad, name)


def test_graph_relu_node_fused_batch_norm_and_no_input_grad_on_device(dev):
    """A Graph's relu node (its backward used numpy: a GPU training step of
    such a graph failed), a Sequential's fused BatchNorm2d + ReLU, and
    set_input_grad(False): forward and backward match the CPU."""
    def net():
        cc.manual_seed(5)
        body = cc.nn.Sequential(cc.nn.Conv2d(3, 8, 3, padding=1), cc.nn.BatchNorm2d(8),
                                cc.nn.ReLU())
        return cc.nn.Graph({"body": body, "head": cc.nn.Conv2d(8, 4, 1)},
                           ["a = body(x)", "b = relu(a)", "y = head(b)"])
    x, gy = rnd(2, 3, 6, 6), rnd(2, 4, 6, 6, seed=3)
    cpu, gpu = net().train(), net().train().to("cuda")
    check(dev, gpu(dev.put(x)), cpu(x), "output")
    check(dev, gpu.backward(dev.put(gy)), cpu.backward(gy), "grad_input")
    cpu.set_input_grad(False)
    gpu.set_input_grad(False)
    for m in (cpu, gpu):
        m.zero_grad()
    cpu(x)
    gpu(dev.put(x))
    assert cpu.backward(gy) is None and gpu.backward(dev.put(gy)) is None
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        check(dev, p.grad, q.grad, name)


def test_dropout_mask_follows_the_input_to_the_device(dev):
    drop = cc.nn.Dropout(0.5)
    y = drop(dev.put(np.ones((4, 50), np.float32)))
    host = dev.host(y)
    assert set(np.unique(host)) <= {0.0, 2.0} and 0 < (host == 0).sum() < host.size
    check(dev, drop.backward(dev.put(np.ones((4, 50), np.float32))), host, "grad")


def test_dropout_draws_its_gpu_mask_on_the_device(dev, monkeypatch):
    """With CuPy's generators available, the mask is drawn on the GPU: no host
    array is copied over (a host sync in every training step otherwise)."""
    if dev.real:
        pytest.skip("checked with the stand-in cupy, whose host copies can be forbidden")
    import cupy
    to_device = cupy.asarray

    class RandomState:      # CuPy's API, numpy's numbers, device arrays out
        def __init__(self, seed):
            self.rng = np.random.default_rng(seed)

        def random_sample(self, size, dtype):
            return to_device(self.rng.random(size).astype(dtype))

    monkeypatch.setattr(cupy, "random", types.SimpleNamespace(RandomState=RandomState),
                        raising=False)
    cc.manual_seed(0)
    drop = cc.nn.Dropout(0.25)
    x = dev.put(np.ones((8, 64), np.float32))

    def no_host_copies(*args, **kwargs):
        raise AssertionError("a host array was copied to the device")
    monkeypatch.setattr(cupy, "asarray", no_host_copies)
    y = drop(x)
    host = dev.host(y)
    assert set(np.unique(host)) <= {0.0, np.float32(1 / 0.75)}
    assert 0 < (host == 0).sum() < host.size
    assert type(drop.backward(y)).__module__ == "cupy"


def test_gpu_backend_on_device(dev):
    """convcore._backends's GPU backend: what the layers, the loss, the
    optimisers and training ask it for, on device arrays."""
    from convcore._backends import GPU, backend_of
    x = rnd(4, 6)
    d = dev.put(x)
    backend = backend_of(d)
    assert backend is GPU and backend.xp is dev.xp
    assert backend.asarray(d, "input") is d
    with pytest.raises(TypeError, match="grad_output is a numpy array"):
        backend.asarray(x, "grad_output")
    host = backend.to_host(d)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, x)
    check(dev, backend.from_host(x), x, "from_host")
    assert backend.updatable(d) is d
    import convcore.cuda.functional as G
    assert backend.functional is G

    mask, device_random = backend.dropout_mask((8, 64), np.dtype(np.float32), 0.25,
                                               np.random.default_rng(0))
    assert type(mask).__module__.split(".")[0] == "cupy" and mask.dtype == np.float32
    assert set(np.unique(dev.host(mask))) == {0.0, np.float32(1 / 0.75)}
    # real CuPy draws on the device with a generator of its own; the stand-in has none
    assert (device_random is not None) == dev.real

    z, t = rnd(4, 10, seed=7), np.array([1, 0, 9, 3])
    options = dict(ignore_index=-100, reduction="mean", label_smoothing=0.1)
    loss, saved = backend.cross_entropy(dev.put(z), t, None, **options)
    check(dev, loss, cc.functional.cross_entropy(z, t, **options), "loss")
    expected = cc.functional.cross_entropy_backward(1.0, z, t, **options)
    check(dev, backend.cross_entropy_grad(saved, None), expected, "grad")
    check(dev, backend.cross_entropy_grad(saved, 2.0), 2 * expected, "grad times 2")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_saves_to_the_host_and_loads_onto_the_device(dev, optimizer):
    model = _net().to("cuda")
    x, t = dev.put(rnd(4, 3, 8, 8)), np.array([1, 0, 9, 3])
    loss_fn = cc.nn.CrossEntropyLoss()

    def make():
        if optimizer == "sgd":
            return cc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return cc.optim.Adam(model.parameters(), lr=0.01)

    def step(opt):
        opt.zero_grad()
        loss_fn(model(x), t)
        model.backward(loss_fn.backward())
        opt.step()

    opt = make()
    step(opt)
    state = opt.state_dict()
    saved = [v for s in state["state"] for v in s.values()]
    assert saved and all(type(v) is np.ndarray for v in saved)  # host copies
    loaded = make()
    loaded.load_state_dict(state)
    for before, after in zip(opt.state, loaded.state):
        assert before.keys() == after.keys()
        for key in before:
            check(dev, after[key], dev.host(before[key]), key)  # on the device
    step(loaded)  # the GPU update takes the loaded state


def test_conv2d_padding_modes_other_than_zeros_say_cpu_only(dev):
    conv = cc.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").to("cuda")
    with pytest.raises(NotImplementedError, match="CPU only"):
        conv(dev.put(rnd(1, 3, 5, 5)))
