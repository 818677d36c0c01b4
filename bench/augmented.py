"""The fused MLP with K-augmented GEMMs: the low-rank terms ride in the big GEMMs (experiment).

Beside W0 (``lorakit.fused.mlp_forms``), each MLP GEMM site first writes the rank-r product
into its output and the GEMM with W0 accumulates onto it: one extra write and an epilogue read
of g|u (N, 2I), y (N, H), dh (N, I) and dx (N, H). If W0 and the factors share one buffer,

    Fgu = [[Wg, sg Bg, 0    ],        Fd = [[Wd,    sd Bd],
           [Wu, 0,     su Bu],              [sd Ad, 0    ]]     (H + rd, I + rd)
           [Ag; Au,    0    ]]  (2I + rg + ru, H + rg + ru)

(W0's parameters become views of it, ``Fgu[:I, :H]`` etc.: row stride H + rg + ru, the same
bytes plus 0.4-0.8%), then each site is ONE GEMM whose K grows by the rank:

    [g | u] = [x | x Ag^T | x Au^T] Fgu[:2I]^T          y  = [h | h Ad^T] Fd[:H]^T
    dh      = [dY | dY Bd] Fd[:, :I]                    dx = [dg | du | dg Bg | du Bu] Fgu[:, :H]

The activations' tails (N x r) are written by the rank-r GEMMs that run anyway; the SwiGLU
kernels write h and [dg | du] straight into their augmented buffers; x and dY are copied into
theirs (an (N, H) copy each, against an (N, 2I) or (N, I) write plus read spared). The factors
are copied into the weight buffers each forward (d r + r k elements per factor).

This script checks the math against ``fused.mlp_forward``/``mlp_backward`` and times it against
them (``mlp_forms``' choice) and the frozen MLP, at the 1B and 8B shapes, with the tails padded
to multiples of 8 (16 bytes in bfloat16: what TMA needs) or of 64.

Result (``bench/results/augmented_h200*.md``, docs/performance.md): at the 8B shape 30-60 us per
layer faster than beside W0 forward and 40-55 us backward with the weights relaid out once and the
factors' copies left out; the copies into the tails cost 15-50 us a direction (strided small
copies). In the library (commit 582aad2: ``lorakit.packed``, the MLP's W0 parameters as views of
these buffers, packed at ``inject``) the training step measured 0.941x the bound packed against
0.939x unpacked at 8B, and 0.951x against 0.964x at 1B (10 ms more host time per forward), so it
was removed; this script keeps the experiment.

    PYTHONPATH=. python bench/augmented.py --out bench/results/augmented_h200
    PYTHONPATH=. python bench/augmented.py --device cpu --sizes smol --dtype float32 --check-only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common, mlp_forms  # noqa: E402
from lorakit import activation, fused  # noqa: E402


def _up(r: int, pad: int) -> int:
    return -(-r // pad) * pad


def relayout(wg, wu, wd, rg: int, ru: int, rd: int, pad: int = 8):
    """(Fgu, Fd): the weight buffers with W0 copied in and zero tails (built once)."""
    i, hid = wg.shape
    tg, td = _up(rg + ru, pad), _up(rd, pad)
    fgu = wg.new_zeros((2 * i + tg, hid + tg))
    fgu[:i, :hid] = wg
    fgu[i:2 * i, :hid] = wu
    fd = wd.new_zeros((hid + td, i + td))
    fd[:hid, :i] = wd
    return fgu, fd


def refresh(fgu, fd, i: int, hid: int, ag, bg, au, bu, ad, bd, sg: float, su: float, sd: float) -> None:
    """Copy the scaled factors into the buffers' tails (each forward: the factors may have changed)."""
    rg, ru, rd = ag.shape[0], au.shape[0], ad.shape[0]
    torch.mul(bg, sg, out=fgu[:i, hid:hid + rg])
    torch.mul(bu, su, out=fgu[i:2 * i, hid + rg:hid + rg + ru])
    torch.mul(ag, sg, out=fgu[2 * i:2 * i + rg, :hid])
    torch.mul(au, su, out=fgu[2 * i + rg:2 * i + rg + ru, :hid])
    torch.mul(bd, sd, out=fd[:hid, i:i + rd])
    torch.mul(ad, sd, out=fd[hid:hid + rd, :i])


def aug_forward(x2, fgu, fd, ag, bg, au, bu, ad, bd, sg, su, sd):
    """(y, xaug, gu, has); xaug = [x | x Ag^T | x Au^T | 0] (N, H + tg) is kept for backward."""
    n, hid = x2.shape
    i = (fgu.shape[0] - (fgu.shape[1] - hid)) // 2
    tg, td = fgu.shape[1] - hid, fd.shape[1] - i
    rg, ru, rd = ag.shape[0], au.shape[0], ad.shape[0]
    refresh(fgu, fd, i, hid, ag, bg, au, bu, ad, bd, sg, su, sd)
    xaug = x2.new_empty((n, hid + tg))
    xaug[:, :hid].copy_(x2)
    torch.mm(x2, torch.cat([ag, au]).t(), out=xaug[:, hid:hid + rg + ru])
    if tg > rg + ru:
        xaug[:, hid + rg + ru:].zero_()
    gu = torch.mm(xaug, fgu[:2 * i].t())                                   # (N, 2I)
    haug = x2.new_empty((n, i + td))
    h = activation.swiglu_forward(gu, out=haug[:, :i])
    has = torch.mm(h, ad.t(), out=haug[:, i:i + rd])                        # h Ad^T (N, rd)
    if td > rd:
        haug[:, i + rd:].zero_()
    y = torch.mm(haug, fd[:hid].t())                                        # (N, H)
    return y, xaug, gu, has.clone()


def aug_backward(dy2, xaug, gu, has, fgu, fd, ag, bg, au, bu, ad, bd, sg, su, sd):
    """(dx, dAgu, dBg, dBu, dAd, dBd), as ``fused.mlp_backward`` returns them."""
    n, hid = dy2.shape
    i = gu.shape[1] // 2
    tg, td = fgu.shape[1] - hid, fd.shape[1] - i
    rg, ru, rd = ag.shape[0], au.shape[0], ad.shape[0]
    x2, xas = xaug[:, :hid], xaug[:, hid:hid + rg + ru]
    dyaug = dy2.new_empty((n, hid + td))
    dyaug[:, :hid].copy_(dy2)
    gd = torch.mm(dy2, bd, out=dyaug[:, hid:hid + rd])                      # dY Bd (N, rd)
    if td > rd:
        dyaug[:, hid + rd:].zero_()
    dh = torch.mm(dyaug, fd[:, :i])                                         # dY Wd + sd (dY Bd) Ad (N, I)
    dBd = torch.addmm(bd, dy2.t(), has, beta=0, alpha=sd)
    dguaug = dy2.new_empty((n, 2 * i + tg))
    dgu = activation.swiglu_backward(dh, gu, out=dguaug[:, :2 * i])         # dh := h
    dAd = torch.addmm(ad, gd.t(), dh, beta=0, alpha=sd)
    gs = torch.mm(dgu, torch.block_diag(bg, bu), out=dguaug[:, 2 * i:2 * i + rg + ru])   # [dg Bg | du Bu]
    if tg > rg + ru:
        dguaug[:, 2 * i + rg + ru:].zero_()
    dx = torch.mm(dguaug, fgu[:, :hid])                                     # (N, H)
    if sg == su:
        dA = torch.addmm(ag[:1].expand(rg + ru, hid), gs.t(), x2, beta=0, alpha=sg)
    else:
        dA = torch.mm(gs.t(), x2)
        dA[:rg] *= sg
        dA[rg:] *= su
    dBg = torch.addmm(bg, dgu[:, :i].t(), xas[:, :rg], beta=0, alpha=sg)
    dBu = torch.addmm(bu, dgu[:, i:].t(), xas[:, rg:], beta=0, alpha=su)
    return dx, dA, dBg, dBu, dAd, dBd


def check(t: dict, pad: int) -> float:
    """Largest relative error of the augmented node against ``fused``'s (forms by mlp_forms)."""
    ad = mlp_forms.adapters(t)
    w = (t["wg"], t["wu"], t["wd"])
    r = [a.shape[0] for a in ad[0::2]]
    fgu, fd = relayout(*w, *r, pad=pad)
    y0, gu0, has0 = fused.mlp_forward(t["x"], *w, *ad, 2.0, 1.5, 0.5, True, True)
    want = fused.mlp_backward(t["dy"], t["x"], gu0, has0, *w, *ad, 2.0, 1.5, 0.5, (True,) * 7)
    y, xaug, gu, has = aug_forward(t["x"], fgu, fd, *ad, 2.0, 1.5, 0.5)
    got = aug_backward(t["dy"], xaug, gu, has, fgu, fd, *ad, 2.0, 1.5, 0.5)
    err = 0.0
    for a, b in zip((y, *got), (y0, *want)):
        err = max(err, ((a.float() - b.float()).norm() / b.float().norm()).item())
    return err


def rows_for(size: str, t: dict, pads: list[int], rounds: int, calls: int) -> list[dict]:
    bf, bb = mlp_forms.bound_fns(t)
    ad = mlp_forms.adapters(t)
    w = (t["wg"], t["wu"], t["wd"])
    f = fused.mlp_forms(t["x"].shape[0], *t["wg"].shape)
    nf, nb = mlp_forms.node_fns(t, f[:2], f[2:])
    fns = {"frozen fwd": bf, "frozen bwd": bb, "node fwd": nf, "node bwd": nb}
    for pad in pads:
        fgu, fd = relayout(*w, *[a.shape[0] for a in ad[0::2]], pad=pad)
        _, xaug, gu, has = aug_forward(t["x"], fgu, fd, *ad, 2.0, 2.0, 2.0)
        fns[f"augmented fwd, pad {pad}"] = (lambda fgu=fgu, fd=fd: aug_forward(t["x"], fgu, fd, *ad, 2.0, 2.0, 2.0))
        fns[f"augmented bwd, pad {pad}"] = (lambda fgu=fgu, fd=fd, xaug=xaug, gu=gu, has=has:
                                            aug_backward(t["dy"], xaug, gu, has, fgu, fd, *ad, 2.0, 2.0, 2.0))
    for f in fns.values():
        for _ in range(2):
            f()
    ts = common.interleaved({k: common.cuda_timer(f, calls) for k, f in fns.items()}, rounds)
    m = {k: common.median(v) for k, v in ts.items()}
    out = []
    for k, ms in m.items():
        d = k.split()[1].rstrip(",")
        frozen, node = m[f"frozen {d}"], m[f"node {d}"]
        out.append(dict(size=size, variant=k, ms=ms, over_frozen_us=(ms - frozen) * 1e3, vs_node=ms / node))
        print(f"{size} {k:<24} {ms:.4f} ms  over frozen {(ms - frozen) * 1e3:6.0f} us  x node {ms / node:.3f}",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--pads", default="8,64")
    p.add_argument("--check-only", action="store_true")
    args = common.gemm_args(p).parse_args(argv)
    dtype = getattr(torch, args.dtype)
    pads = [int(v) for v in args.pads.split(",")]
    rows = []
    for size in args.sizes.split(","):
        t = mlp_forms.tensors(size, int(args.r), args.device, dtype)
        for pad in pads:
            e = check(t, pad)
            print(f"{size} pad {pad}: largest relative error against fused {e:.2e}", flush=True)
            rows.append(dict(size=size, variant=f"check, pad {pad}", ms=float("nan"), over_frozen_us=float("nan"),
                             vs_node=e))
        if not args.check_only:
            rows += rows_for(size, t, pads, args.rounds, args.calls)
        common.free(t)
    if args.check_only:
        return 0
    setup = (f"{args.dtype}, r={args.r}; median over {args.rounds} interleaved rounds of {args.calls} back-to-back "
             f"calls (CUDA events); tokens {', '.join(f'{s} {mlp_forms.TOKENS[s]}' for s in args.sizes.split(','))}; "
             "check rows: relative error against fused (x node column)")
    common.report(rows, [("size", "size", ""), ("variant", "variant", ""), ("ms", "ms", "{:.4f}"),
                         ("over_frozen_us", "over frozen us", "{:.0f}"), ("vs_node", "x node", "{:.3g}")],
                  args.out, args.device, "The fused MLP with K-augmented GEMMs", setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
