"""Optimisers and learning-rate schedules: against torch.optim on the same
gradients, plus torch-free behaviour and argument checks."""
import math

import numpy as np
import pytest

import convcore
from convcore.nn import Linear, Parameter
from convcore.optim import SGD, Adam, ReduceLROnPlateau, StepLR

SHAPES = [(3, 4), (5,), (2, 1, 3, 3)]


def _params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def _gradients(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(steps)]


def _run_convcore(make_opt, grads):
    params = _params()
    opt = make_opt(params)
    for step_grads in grads:
        opt.zero_grad()
        for p, g in zip(params, step_grads):
            p.grad += g
        opt.step()
    return [p.data for p in params]


def _run_torch(make_opt, grads):
    torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
    params = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in _params()]
    opt = make_opt(params)
    for step_grads in grads:
        opt.zero_grad()
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return [p.detach().numpy() for p in params]


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=5e-4),
    dict(lr=0.02, momentum=0.8, nesterov=True),
    dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3),
]

ADAM_CASES = [
    dict(),
    dict(lr=0.01, betas=(0.8, 0.99)),
    dict(lr=0.003, weight_decay=0.01, eps=1e-6),
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_matches_torch(kwargs):
    torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
    grads = _gradients(8)
    ours = _run_convcore(lambda ps: SGD(ps, **kwargs), grads)
    theirs = _run_torch(lambda ps: torch.optim.SGD(ps, **kwargs), grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=str)
def test_adam_matches_torch(kwargs):
    torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
    grads = _gradients(8)
    ours = _run_convcore(lambda ps: Adam(ps, **kwargs), grads)
    theirs = _run_torch(lambda ps: torch.optim.Adam(ps, **kwargs), grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_float32_parameters_stay_float32():
    layer = Linear(3, 2)
    for opt in (SGD(layer.parameters(), 0.1, momentum=0.9, weight_decay=0.1),
                Adam(layer.parameters(), weight_decay=0.1)):
        for p in layer.parameters():
            p.grad[...] = 1
        opt.step()
        opt.step()
        assert all(p.data.dtype == np.float32 for p in layer.parameters())
        assert all(v.dtype == np.float32 for s in opt.state for v in s.values())


# --------------------------------------------------------------- torch-free

def _quadratic_descent(opt_factory, steps):
    """Minimises 0.5 * sum(a * (w - target)^2); returns the final distance."""
    target = np.array([1.0, -2.0, 3.0])
    a = np.array([1.0, 4.0, 0.5])
    w = Parameter(np.zeros(3))
    opt = opt_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        w.grad += a * (w.data - target)
        opt.step()
    return np.abs(w.data - target).max()


@pytest.mark.parametrize("factory", [
    lambda ps: SGD(ps, lr=0.1),
    lambda ps: SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    lambda ps: Adam(ps, lr=0.1),
], ids=["sgd", "momentum", "nesterov", "adam"])
def test_converges_on_a_quadratic(factory):
    assert _quadratic_descent(factory, 400) < 1e-3


def test_weight_decay_shrinks_weights_without_gradient():
    w = Parameter(np.full(4, 2.0))
    opt = SGD([w], lr=0.1, weight_decay=0.5)
    opt.step()
    np.testing.assert_allclose(w.data, 2.0 * (1 - 0.1 * 0.5))
    for _ in range(50):
        opt.step()
    assert np.all(np.abs(w.data) < 0.2)


def test_zero_grad_and_no_gradient_no_move():
    w = Parameter(np.ones(3))
    w.grad += 5
    opt = SGD([w], lr=0.1, momentum=0.9)
    opt.zero_grad()
    assert not w.grad.any()
    opt.step()
    np.testing.assert_array_equal(w.data, 1.0)


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda ps: Adam(ps, lr=0.01, weight_decay=0.01),
], ids=["sgd", "adam"])
def test_state_dict_resumes_exactly(make):
    grads = _gradients(6)
    straight = _run_convcore(make, grads)

    params = _params()
    opt = make(params)
    for step_grads in grads[:3]:
        opt.zero_grad()
        for p, g in zip(params, step_grads):
            p.grad += g
        opt.step()
    saved = opt.state_dict()
    saved_weights = [p.data.copy() for p in params]
    opt.step()  # changes the live state; the saved copy must not follow

    resumed = _params()
    for p, w in zip(resumed, saved_weights):
        p.data = w
    opt2 = make(resumed)
    opt2.lr = 123.0  # load_state_dict restores lr too
    opt2.load_state_dict(saved)
    for step_grads in grads[3:]:
        opt2.zero_grad()
        for p, g in zip(resumed, step_grads):
            p.grad += g
        opt2.step()
    for a, b in zip(straight, resumed):
        np.testing.assert_allclose(b.data, a, rtol=1e-14)


def test_load_state_dict_rejects_mismatches():
    opt = SGD(_params(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Adam"):
        opt.load_state_dict(Adam(_params()).state_dict())
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(SGD(_params()[:2], lr=0.1).state_dict())
    other = SGD([Parameter(np.zeros(s[::-1])) for s in SHAPES], lr=0.1, momentum=0.9)
    for p in other.params:
        p.grad += 1
    other.step()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("call, match", [
    (lambda: SGD(_params(), lr=-1), "lr"),
    (lambda: SGD(_params(), lr=0.1, momentum=-0.5), "momentum"),
    (lambda: SGD(_params(), lr=0.1, dampening=2), "dampening"),
    (lambda: SGD(_params(), lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda: SGD(_params(), lr=0.1, nesterov=True), "nesterov"),
    (lambda: SGD(_params(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda: SGD([], lr=0.1), "empty"),
    (lambda: Adam(_params(), betas=(0.9, 1.0)), "betas"),
    (lambda: Adam(_params(), eps=-1e-8), "eps"),
    (lambda: Adam(_params(), lr=math.nan), "lr"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types_raise_type_error():
    p = Parameter(np.zeros(3))
    with pytest.raises(TypeError, match="params"):
        SGD(p, lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        SGD([p, np.zeros(3)], lr=0.1)
    with pytest.raises(TypeError, match="lr"):
        SGD([p], lr="0.1")
    with pytest.raises(TypeError, match="betas"):
        Adam([p], betas=0.9)
    with pytest.raises(TypeError, match="optimizer"):
        StepLR(object(), step_size=2)
    with pytest.raises(ValueError, match="more than once"):
        SGD([p, p], lr=0.1)


# ------------------------------------------------------------------ schedules

def _torch_optimizer(lr):
    torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
    return torch, torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("step_size, gamma", [(1, 0.5), (3, 0.1), (4, 0.7)])
def test_step_lr_matches_torch(step_size, gamma):
    torch, topt = _torch_optimizer(0.1)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=step_size, gamma=gamma)
    opt = SGD(_params(), lr=0.1)
    sched = StepLR(opt, step_size=step_size, gamma=gamma)
    for _ in range(12):
        topt.step()
        tsched.step()
        sched.step()
        assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-15)
        assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr()[0], rel=1e-15)


# accuracy-like (max) and loss-like (min) sequences with plateaus and small gains
MAX_METRICS = [0.5, 0.6, 0.6, 0.6, 0.60001, 0.7, 0.7, 0.7, 0.7, 0.7, 0.71, 0.71, 0.71, 0.71,
               0.71, 0.72, 0.72, 0.72, 0.72, 0.72, 0.72]
MIN_METRICS = [2.0, 1.5, 1.5, 1.49999, 1.5, 1.4, 1.41, 1.42, 1.2, 1.2, 1.2, 1.2, 1.2, 1.19,
               1.19, 1.19, 1.19, 1.19, 1.19]


@pytest.mark.parametrize("kwargs", [
    dict(mode="max", patience=2),
    dict(mode="max", patience=0, factor=0.5, min_lr=0.01),
    dict(mode="max", patience=1, threshold=0.05, threshold_mode="abs", cooldown=2),
    dict(mode="min", patience=2),
    dict(mode="min", patience=1, threshold=0.01, cooldown=1, factor=0.3),
    dict(mode="min", patience=0, threshold_mode="abs", threshold=0.005, min_lr=1e-3),
], ids=str)
def test_reduce_lr_on_plateau_matches_torch(kwargs):
    torch, topt = _torch_optimizer(0.1)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    opt = SGD(_params(), lr=0.1)
    sched = ReduceLROnPlateau(opt, **kwargs)
    metrics = MAX_METRICS if kwargs["mode"] == "max" else MIN_METRICS
    lrs = []
    for m in metrics:
        tsched.step(m)
        sched.step(m)
        lrs.append(opt.lr)
        assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-15)
        assert sched.num_bad_epochs == tsched.num_bad_epochs
        assert sched.best == tsched.best
    assert lrs[-1] < 0.1  # every case reduces at least once


def test_reduce_lr_on_plateau_divides_by_ten_on_plateau():
    opt = SGD(_params(), lr=0.01)
    sched = ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=2)
    for acc in [0.5, 0.7, 0.8, 0.8, 0.8]:
        sched.step(acc)
    assert opt.lr == pytest.approx(0.01)
    sched.step(0.8)  # third epoch without improvement: more than patience
    assert opt.lr == pytest.approx(0.001)
    sched.step(0.9)
    assert opt.lr == pytest.approx(0.001)


def test_scheduler_state_dict_round_trip():
    opt = SGD(_params(), lr=0.1)
    sched = ReduceLROnPlateau(opt, mode="max", patience=1)
    for m in [0.1, 0.2, 0.2]:
        sched.step(m)
    state = sched.state_dict()
    other = ReduceLROnPlateau(SGD(_params(), lr=0.1), mode="max", patience=1)
    other.load_state_dict(state)
    assert other.best == 0.2 and other.num_bad_epochs == 1 and other.last_epoch == 3
    with pytest.raises(ValueError, match="unknown"):
        other.load_state_dict({"bogus": 1})


@pytest.mark.parametrize("call, match", [
    (lambda o: StepLR(o, step_size=0), "step_size"),
    (lambda o: StepLR(o, step_size=2, gamma=-0.1), "gamma"),
    (lambda o: ReduceLROnPlateau(o, mode="up"), "mode"),
    (lambda o: ReduceLROnPlateau(o, factor=1.0), "factor"),
    (lambda o: ReduceLROnPlateau(o, patience=-1), "patience"),
    (lambda o: ReduceLROnPlateau(o, threshold_mode="pct"), "threshold_mode"),
    (lambda o: ReduceLROnPlateau(o, min_lr=-1), "min_lr"),
])
def test_scheduler_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(SGD(_params(), lr=0.1))


# ------------------------------------------------- the one-pass update (sgd_step)

def _sgd_reference(w, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """torch.optim.SGD's rule in numpy expressions, operation by operation
    (what convcore.optim.SGD computed before the core's sgd_step)."""
    g = grad
    if weight_decay:
        g = g + weight_decay * w
    if momentum:
        buf = np.array(g, copy=True) if first else buf * momentum + (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return w - lr * g, buf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov", [
    (0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False), (0.9, 0.1, 5e-4, False),
    (0.9, 0.0, 1e-2, True), (0.0, 0.0, 1e-3, False)])
def test_sgd_step_is_the_numpy_rule_bit_for_bit(dtype, momentum, dampening, weight_decay,
                                                nesterov):
    rng = np.random.default_rng(7)
    shape = (70, 1100)  # 77,000 elements: several tasks of the core's split
    w = rng.standard_normal(shape).astype(dtype)
    buf = np.empty_like(w)
    ref_w, ref_buf = w.copy(), None
    for step in range(3):
        grad = rng.standard_normal(shape).astype(dtype)
        first = step == 0
        ref_w, ref_buf = _sgd_reference(ref_w, grad, ref_buf, 0.05, momentum, dampening,
                                        weight_decay, nesterov, first)
        convcore.functional.sgd_step(w, grad, buf, 0.05, momentum, dampening, weight_decay,
                                     nesterov, first)
        np.testing.assert_array_equal(w, ref_w)
        if momentum:
            np.testing.assert_array_equal(buf, ref_buf)


def test_sgd_step_of_non_contiguous_parameters_and_gradients():
    """A parameter that is a strided view is updated through a copy; a
    strided gradient is read through a copy."""
    rng = np.random.default_rng(8)
    base = rng.standard_normal((8, 12)).astype(np.float32)
    p = Parameter(base.copy())
    p.data = p.data[:, ::2]  # a view: not contiguous
    p.grad = np.asfortranarray(rng.standard_normal((8, 6)).astype(np.float32))
    expected = p.data - np.float32(0.1) * p.grad
    SGD([p], lr=0.1).step()
    np.testing.assert_array_equal(p.data, expected)
    q = Parameter(base.astype(">f4"))  # byte-swapped: updated through a native copy
    q.grad = np.ones((8, 12), np.float32)
    SGD([q], lr=0.5, momentum=0.9).step()
    np.testing.assert_array_equal(q.data, base - np.float32(0.5))
    r = Parameter(base.copy())  # a dtype equal to float32 but another object
    r.data = r.data.view(np.dtype("<f4", metadata={"m": 1}))
    r.grad = np.ones((8, 12), np.float32)
    SGD([r], lr=0.5, momentum=0.9).step()
    np.testing.assert_array_equal(r.data, base - np.float32(0.5))


def test_sgd_step_bad_arguments():
    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="grad"):
        convcore.functional.sgd_step(w, np.zeros((4, 5), np.float32), None, 0.1)
    with pytest.raises(TypeError, match="grad"):
        convcore.functional.sgd_step(w, np.zeros((4, 4), np.float64), None, 0.1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        convcore.functional.sgd_step(w, np.zeros((4, 4), np.float32), None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="data must be a writeable C-contiguous"):
        convcore.functional.sgd_step(w.astype(">f4"), np.zeros((4, 4), np.float32), None, 0.1)
    with pytest.raises(ValueError, match="data must be a writeable C-contiguous"):
        convcore.functional.sgd_step(w[:, ::2], np.zeros((4, 2), np.float32), None, 0.1)


def _adam_reference(w, grad, m, v, step_size, beta1, beta2, root_correction2, eps, weight_decay):
    """torch.optim.Adam's rule in numpy expressions (convcore.optim.Adam's
    update before the core's adam_step)."""
    g = grad + weight_decay * w if weight_decay else grad
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * (g * g)
    return w - step_size * (m / (np.sqrt(v) / root_correction2 + eps)), m, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_step_is_the_numpy_rule_bit_for_bit(dtype, weight_decay):
    rng = np.random.default_rng(9)
    shape = (70, 1100)
    w = rng.standard_normal(shape).astype(dtype)
    m, v = np.zeros_like(w), np.zeros_like(w)
    ref = (w.copy(), m.copy(), v.copy())
    beta1, beta2 = 0.9, 0.999
    for t in range(1, 4):
        grad = rng.standard_normal(shape).astype(dtype)
        step_size, rc2 = 1e-3 / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t)
        ref = _adam_reference(*ref[:1], grad, *ref[1:], step_size, beta1, beta2, rc2, 1e-8,
                              weight_decay)
        convcore.functional.adam_step(w, grad, m, v, step_size, beta1, beta2, rc2, 1e-8,
                                      weight_decay)
        for got, expected in zip((w, m, v), ref):
            np.testing.assert_array_equal(got, expected)


def test_adam_updates_a_non_contiguous_parameter_and_checks_its_state():
    rng = np.random.default_rng(10)
    base = rng.standard_normal((6, 10)).astype(np.float32)
    p, q = Parameter(base.copy()), Parameter(base.copy())
    p.data = p.data[:, ::2]  # a view: updated through a contiguous copy
    q.data = np.ascontiguousarray(q.data[:, ::2])
    p.grad = q.grad = rng.standard_normal((6, 5)).astype(np.float32)
    Adam([p], lr=0.01).step()
    Adam([q], lr=0.01).step()
    np.testing.assert_array_equal(p.data, q.data)
    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="exp_avg_sq must be a writeable C-contiguous"):
        convcore.functional.adam_step(w, w.copy(), w.copy(), w.copy()[:, ::2], 0.1, 0.9, 0.999,
                                      1.0, 1e-8)
    with pytest.raises(ValueError, match="exp_avg"):
        convcore.functional.adam_step(w, w.copy(), np.zeros((4, 5), np.float32), w.copy(), 0.1,
                                      0.9, 0.999, 1.0, 1e-8)


def test_optimisers_update_through_the_functional_steps(monkeypatch):
    """SGD and Adam take functional.sgd_step / adam_step (one path for CPU
    and GPU, dispatched by array type), once per parameter and step."""
    calls = []
    for name in ("sgd_step", "adam_step"):
        original = getattr(convcore.functional, name)
        monkeypatch.setattr(convcore.functional, name,
                            lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k)))
    layer = Linear(3, 2)
    for p in layer.parameters():
        p.grad = np.ones_like(p.data)
    SGD(layer.parameters(), lr=0.1, momentum=0.9).step()
    Adam(layer.parameters()).step()
    assert calls == ["sgd_step"] * 2 + ["adam_step"] * 2
