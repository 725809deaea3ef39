"""Every GEMM microkernel path (AVX-512, AVX2+FMA, portable), and the kernels
dispatched with it (depthwise flat, row and blocked kernels, Winograd's transforms),
against the reference, each in a subprocess with CONVCORE_ISA capping the
dispatch (the choice is made once per process)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as ref

SCRIPT = r"""
import json, sys
import numpy as np
import convcore
rng = np.random.default_rng(7)
out = {"isa": convcore._core.gemm_isa()}
for dtype in ("float32", "float64"):
    # Odd sizes so that edge tiles (partial MR x NR) are exercised.
    x = rng.standard_normal((2, 6, 13, 11)).astype(dtype)
    w = rng.standard_normal((10, 3, 3, 2)).astype(dtype)
    b = rng.standard_normal(10).astype(dtype)
    y = convcore.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx, gw, gb = convcore.conv2d_backward(gy, x, w, stride=(2, 1), padding=1, dilation=(1, 2),
                                          groups=2)
    # depthwise, stride 1: the flat kernels (a multiplier of 2, 5x5 taps: groups of 9, 3, 1)
    dw = rng.standard_normal((8, 1, 5, 5)).astype(dtype)
    dy = convcore.conv2d(x[:, :4], dw, b[:8], padding=(2, 1), dilation=(1, 2), groups=4)
    dgy = rng.standard_normal(dy.shape).astype(dtype)
    dgx, dgw, dgb = convcore.conv2d_backward(dgy, x[:, :4], dw, padding=(2, 1), dilation=(1, 2),
                                             groups=4)
    # depthwise, stride 2: the flat kernels over phase planes
    sy = convcore.conv2d(x[:, :4], dw[::2], b[:4], stride=2, padding=2, groups=4)
    sgy = rng.standard_normal(sy.shape).astype(dtype)
    sgx, sgw, _ = convcore.conv2d_backward(sgy, x[:, :4], dw[::2], stride=2, padding=2,
                                           groups=4)
    # depthwise 5x5 on 20 channels (float32: the blocked kernels with the
    # channels in the lanes, a last block part-filled; 37 columns: whole
    # transposes and a tail), and on a view with rows of stride 2
    px = rng.standard_normal((2, 20, 9, 37)).astype(dtype)
    pw = rng.standard_normal((20, 1, 5, 5)).astype(dtype)
    pany = convcore.conv2d(px, pw, None, padding=2, groups=20)
    psy = convcore.conv2d(px[:, :, :, ::2], pw, None, stride=2, padding=(1, 2), groups=20)
    pgy = rng.standard_normal(psy.shape).astype(dtype)
    pgx, pgw, pgb = convcore.conv2d_backward(pgy, px[:, :, :, ::2], pw, stride=2,
                                             padding=(1, 2), groups=20)
    # Winograd F(2x2, 3x3) and F(4x4, 3x3): the tile transforms
    ww = rng.standard_normal((5, 6, 3, 3)).astype(dtype)
    wino = {}
    for algo in ("winograd", "winograd4"):
        wy = convcore.conv2d(x, ww, b[:5], padding=1, algorithm=algo)
        wgy = rng.standard_normal(wy.shape).astype(dtype)
        wgx, wgw, _ = convcore.conv2d_backward(wgy, x, ww, padding=1, algorithm=algo)
        wino.update({algo + "_y": wy, algo + "_gy": wgy, algo + "_gx": wgx, algo + "_gw": wgw})
    # pointwise grad_input at batch 1: the weights read in place by columns,
    # 37 input channels (a part-filled last panel)
    ox = rng.standard_normal((1, 37, 7, 7)).astype(dtype)
    ow = rng.standard_normal((29, 37, 1, 1)).astype(dtype)
    ogy = rng.standard_normal((1, 29, 7, 7)).astype(dtype)
    ogx = convcore.conv2d_backward(ogy, ox, ow, output_mask=(True, False, False))[0]
    # tiles of every row count 1..13 (the last rows of M in blocks of 4, 6
    # or 12): pointwise forwards with m output channels, grad_inputs into m
    # input channels, at batch 1 (weights read in place) and 2 (packed)
    rx = {(m, n): rng.standard_normal((n, m, 5, 7)).astype(dtype) for m in range(1, 14)
          for n in (1, 2)}
    rw = rng.standard_normal((13, 23, 1, 1)).astype(dtype)
    rpx = {n: rng.standard_normal((n, 23, 5, 7)).astype(dtype) for n in (1, 2)}
    rgy = {n: rng.standard_normal((n, 23, 5, 7)).astype(dtype) for n in (1, 2)}
    rows_y = {(m, n): convcore.conv2d(rpx[n], rw[:m]) for m in range(1, 14) for n in (1, 2)}
    rows_gx = {(m, n): convcore.conv2d_backward(rgy[n], rx[m, n], rw[:m].transpose(1, 0, 2, 3),
                                                output_mask=(True, False, False))[0]
               for m in range(1, 14) for n in (1, 2)}
    # a strided 1x1 layer at batch 1 and 3: the subsampled pointwise paths
    # or the GEMM paths, as the instruction set's rule says
    s1x = {m: rng.standard_normal((m, 24, 9, 9)).astype(dtype) for m in (1, 3)}
    s1gy = {m: rng.standard_normal((m, 19, 5, 5)).astype(dtype) for m in (1, 3)}
    s1g = {m: convcore.conv2d_backward(s1gy[m], s1x[m], ow[:19, :24], stride=2)
           for m in (1, 3)}
    s1y = {m: convcore.conv2d(s1x[m], ow[:19, :24], stride=2) for m in (1, 3)}
    # the direct forward with positions in the lanes (7 output channels:
    # a part-filled panel), its blocks across output rows, grad_input into
    # 4 channels on it (the filters flipped), and grad_weight with the
    # positions in the lanes (rows of 21: a masked last vector)
    lnx = rng.standard_normal((4, 4, 9, 21)).astype(dtype)
    lnw = rng.standard_normal((7, 4, 2, 5)).astype(dtype)
    lny = convcore.conv2d(lnx, lnw, b[:7], padding=(1, 2), dilation=(2, 1))
    lngy = rng.standard_normal(lny.shape).astype(dtype)
    lngx, lngw, _ = convcore.conv2d_backward(lngy, lnx, lnw, padding=(1, 2), dilation=(2, 1),
                                             output_mask=(True, True, False))
    # grouped grad_weight with the channels in the lanes: 16 input channels
    # a group (a whole AVX-512 vector of float32, two of AVX2's) and 8 (half
    # of one: AVX2's vectors under AVX-512), 12 outputs a group, strided
    gwx = rng.standard_normal((2, 64, 9, 8)).astype(dtype)
    gww = {cg: rng.standard_normal((48, cg, 3, 3)).astype(dtype) for cg in (8, 16)}
    gwy = {cg: rng.standard_normal((2, 48, 5, 4)).astype(dtype) for cg in (8, 16)}
    ggw = {cg: convcore.conv2d_backward(gwy[cg], gwx, gww[cg], stride=2, padding=1,
                                        groups=64 // cg, output_mask=(False, True, False))[1]
           for cg in (8, 16)}
    a = rng.standard_normal((37, 300)).astype(dtype)
    lw = rng.standard_normal((45, 300)).astype(dtype)
    ly = convcore.linear(a, lw)
    # the small-batch kernels: 1, 2 and 4-row dot tiles, in_features of a
    # vector and a tail (21) and under one vector (5), a bias
    sa = {m: rng.standard_normal((m, 21)).astype(dtype) for m in (1, 3, 6)}
    slw = rng.standard_normal((19, 21)).astype(dtype)
    sb = rng.standard_normal(19).astype(dtype)
    sly = {m: convcore.linear(v, slw, sb) for m, v in sa.items()}
    sly5 = convcore.linear(sa[3][:, :5], slw[:, :5].copy())
    out[dtype] = {k: v.tolist() for k, v in dict(x=x, w=w, b=b, y=y, gy=gy, gx=gx, gw=gw,
                                                 dw=dw, dy=dy, dgy=dgy, dgx=dgx, dgw=dgw,
                                                 dgb=dgb, a=a, lw=lw, ly=ly, sy=sy, sgy=sgy,
                                                 sgx=sgx, sgw=sgw, ww=ww, px=px, pw=pw,
                                                 pany=pany, psy=psy, pgy=pgy, pgx=pgx,
                                                 pgw=pgw, pgb=pgb, slw=slw, sb=sb, sly5=sly5,
                                                 ox=ox, ow=ow, ogy=ogy, ogx=ogx, gwx=gwx,
                                                 lnx=lnx, lnw=lnw, lny=lny, lngy=lngy, lngx=lngx,
                                                 lngw=lngw,
                                                 **{f"gww{c}": gww[c] for c in gww},
                                                 **{f"gwy{c}": gwy[c] for c in gwy},
                                                 **{f"ggw{c}": ggw[c] for c in ggw},
                                                 **{f"sa{m}": v for m, v in sa.items()},
                                                 **{f"sly{m}": v for m, v in sly.items()},
                                                 rw=rw, **{f"rpx{n}": rpx[n] for n in rpx},
                                                 **{f"rgy{n}": rgy[n] for n in rgy},
                                                 **{f"rx{m}_{n}": v for (m, n), v in rx.items()},
                                                 **{f"rows_y{m}_{n}": v
                                                    for (m, n), v in rows_y.items()},
                                                 **{f"rows_gx{m}_{n}": v
                                                    for (m, n), v in rows_gx.items()},
                                                 **{f"s1x{m}": s1x[m] for m in s1x},
                                                 **{f"s1gy{m}": s1gy[m] for m in s1x},
                                                 **{f"s1y{m}": s1y[m] for m in s1x},
                                                 **{f"s1gx{m}": s1g[m][0] for m in s1x},
                                                 **{f"s1gw{m}": s1g[m][1] for m in s1x},
                                                 **wino).items()}
json.dump(out, sys.stdout)
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_gemm_paths_match_reference(isa):
    flags = _cpu_flags()
    if isa == "avx512" and "avx512f" not in flags:
        pytest.skip("this CPU has no AVX-512")
    if isa == "avx2" and not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU has no AVX2+FMA")
    env = dict(os.environ, CONVCORE_ISA=isa)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, check=True)
    out = json.loads(result.stdout)
    if isa == "generic" or flags & {"avx2", "avx512f"}:
        assert out["isa"] == isa
    for dtype, rtol in (("float32", 2e-5), ("float64", 1e-12)):
        d = {k: np.asarray(v, dtype=dtype) for k, v in out[dtype].items()}
        kw = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
        expect_y = ref.conv2d_ref(d["x"], d["w"], d["b"], **kw)
        expect_gx, expect_gw, _ = ref.conv2d_backward_ref(d["gy"], d["x"], d["w"], **kw)
        expect_ly = ref.linear_ref(d["a"], d["lw"])
        dkw = dict(padding=(2, 1), dilation=(1, 2), groups=4)
        dx = d["x"][:, :4]
        expect_dy = ref.conv2d_ref(dx, d["dw"], d["b"][:8], **dkw)
        expect_dgx, expect_dgw, expect_dgb = ref.conv2d_backward_ref(d["dgy"], dx, d["dw"], **dkw)
        skw = dict(stride=2, padding=2, groups=4)
        expect_sy = ref.conv2d_ref(dx, d["dw"][::2], d["b"][:4], **skw)
        expect_sgx, expect_sgw, _ = ref.conv2d_backward_ref(d["sgy"], dx, d["dw"][::2], **skw)
        checks = [("y", d["y"], expect_y), ("gx", d["gx"], expect_gx),
                  ("gw", d["gw"], expect_gw), ("ly", d["ly"], expect_ly),
                  ("dy", d["dy"], expect_dy), ("dgx", d["dgx"], expect_dgx),
                  ("dgw", d["dgw"], expect_dgw), ("dgb", d["dgb"], expect_dgb),
                  ("sy", d["sy"], expect_sy), ("sgx", d["sgx"], expect_sgx),
                  ("sgw", d["sgw"], expect_sgw),
                  ("pany", d["pany"], ref.conv2d_ref(d["px"], d["pw"], padding=2, groups=20)),
                  ("psy", d["psy"], ref.conv2d_ref(d["px"][:, :, :, ::2], d["pw"], stride=2,
                                                   padding=(1, 2), groups=20))]
        pkw = dict(stride=2, padding=(1, 2), groups=20)
        checks += list(zip(("pgx", "pgw", "pgb"), (d["pgx"], d["pgw"], d["pgb"]),
                           ref.conv2d_backward_ref(d["pgy"], d["px"][:, :, :, ::2], d["pw"],
                                                   **pkw)))
        for m in (1, 3, 6):
            checks.append((f"sly{m}", d[f"sly{m}"], ref.linear_ref(d[f"sa{m}"], d["slw"],
                                                                   d["sb"])))
        checks.append(("sly5", d["sly5"], ref.linear_ref(d["sa3"][:, :5], d["slw"][:, :5])))
        checks.append(("ogx", d["ogx"], ref.conv2d_backward_ref(d["ogy"], d["ox"], d["ow"])[0]))
        for m in range(1, 14):
            for n in (1, 2):
                rwm = d["rw"][:m]
                checks += [(f"rows_y{m}_{n}", d[f"rows_y{m}_{n}"], ref.conv2d_ref(d[f"rpx{n}"], rwm)),
                           (f"rows_gx{m}_{n}", d[f"rows_gx{m}_{n}"],
                            ref.conv2d_backward_ref(d[f"rgy{n}"], d[f"rx{m}_{n}"],
                                                    d["rw"][:m].transpose(1, 0, 2, 3))[0])]
        for m in (1, 3):
            s1w = d["ow"][:19, :24]
            s1gx, s1gw, _ = ref.conv2d_backward_ref(d[f"s1gy{m}"], d[f"s1x{m}"], s1w, stride=2)
            checks += [(f"s1y{m}", d[f"s1y{m}"], ref.conv2d_ref(d[f"s1x{m}"], s1w, stride=2)),
                       (f"s1gx{m}", d[f"s1gx{m}"], s1gx), (f"s1gw{m}", d[f"s1gw{m}"], s1gw)]
        lkw = dict(padding=(1, 2), dilation=(2, 1))
        checks += [("lny", d["lny"], ref.conv2d_ref(d["lnx"], d["lnw"], d["b"][:7], **lkw)),
                   *zip(("lngx", "lngw"), (d["lngx"], d["lngw"]),
                        ref.conv2d_backward_ref(d["lngy"], d["lnx"], d["lnw"], **lkw)[:2])]
        for cg in (8, 16):
            checks.append((f"ggw{cg}", d[f"ggw{cg}"],
                           ref.conv2d_backward_ref(d[f"gwy{cg}"], d["gwx"], d[f"gww{cg}"],
                                                   stride=2, padding=1, groups=64 // cg)[1]))
        for algo in ("winograd", "winograd4"):
            wgx, wgw, _ = ref.conv2d_backward_ref(d[algo + "_gy"], d["x"], d["ww"], padding=1)
            checks += [(algo + "_y", d[algo + "_y"],
                        ref.conv2d_ref(d["x"], d["ww"], d["b"][:5], padding=1)),
                       (algo + "_gx", d[algo + "_gx"], wgx), (algo + "_gw", d[algo + "_gw"], wgw)]
        for name, got, expect in checks:
            scale = np.abs(expect).max()
            np.testing.assert_allclose(got, expect, rtol=0, atol=rtol * scale * 10,
                                       err_msg=f"{isa} {dtype} {name}")
