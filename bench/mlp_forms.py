"""The fused MLP's four GEMM sites, merged or beside W0, timed (``lorakit.fused.mlp_forms``).

Each site's big GEMM runs either with W' = W0 + s B A (a pass that reads W0 and writes W', the
LoRA factors appended to W' so the rank-r products ride in the GEMM) or with W0 itself,
accumulating onto s (rank-r product) B^T written first into its output (cuBLAS with beta = 1
reads it in the epilogue). Two tables:

* the epilogue read alone: ``mm(x, W)`` against ``out.addmm_(x, W)`` at each site's shape, and
  the difference as a fraction ``c`` of a plain pass over ``out`` (a copy's read half);
* the node's forward and backward (``fused.mlp_forward``, ``fused.mlp_backward``) with each
  site's form forced, against the frozen MLP (the same GEMMs with W0 and the SwiGLU kernels).

Medians of interleaved rounds of back-to-back calls (CUDA events), bfloat16, r = 16.

    PYTHONPATH=. python bench/mlp_forms.py --out bench/results/mlp_forms_h200
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from lorakit import activation, fused  # noqa: E402

TOKENS = {"1b": 8192, "8b": 4096, "smol": 512}
FWD = {"merged": (True, True), "gate|up beside": (False, True), "down beside": (True, False),
       "both beside": (False, False)}
BWD = {"merged": (True, True), "down beside": (False, True), "gate|up beside": (True, False),
       "both beside": (False, False)}


def tensors(size: str, r: int, device: str, dtype=torch.bfloat16) -> dict:
    """Random MLP weights, adapters, input and upstream gradient at a size's shape."""
    s = common.SIZES[size]
    h, i, n = s["hidden"], s["inter"], TOKENS[size]
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g) * std
    t = dict(x=rnd(n, h), dy=rnd(n, h), wg=rnd(i, h, std=h ** -0.5), wu=rnd(i, h, std=h ** -0.5),
             wd=rnd(h, i, std=i ** -0.5))
    for p, (d, k) in (("g", (i, h)), ("u", (i, h)), ("d", (h, i))):
        t["a" + p], t["b" + p] = rnd(r, k, std=k ** -0.5), rnd(d, r, std=0.01)
    return t


def adapters(t: dict) -> list:
    return [t[k] for k in ("ag", "bg", "au", "bu", "ad", "bd")]


def node_fns(t: dict, fwd: tuple, bwd: tuple):
    """(forward, backward) closures of the fused node with the given forms (scales 2.0)."""
    x, dy, w = t["x"], t["dy"], (t["wg"], t["wu"], t["wd"])
    _, gu, has = fused.mlp_forward(x, *w, *adapters(t), 2.0, 2.0, 2.0, True, True, forms=fwd + bwd)
    need = (True,) * 7
    return (lambda: fused.mlp_forward(x, *w, *adapters(t), 2.0, 2.0, 2.0, True, True, forms=fwd + bwd),
            lambda: fused.mlp_backward(dy, x, gu, has, *w, *adapters(t), 2.0, 2.0, 2.0, need, forms=fwd + bwd))


def bound_fns(t: dict):
    """The frozen MLP's work: forward GEMMs and SwiGLU, backward dh, SwiGLU backward, dx."""
    x, dy, wg, wu, wd = t["x"], t["dy"], t["wg"], t["wu"], t["wd"]
    i = wg.shape[0]
    wgu = torch.cat([wg, wu])
    gu = torch.mm(x, wgu.t())

    def fwd():
        h = activation.swiglu_forward(torch.mm(x, wgu.t()))
        return torch.mm(h, wd.t())

    def bwd():
        dgu = activation.swiglu_backward(torch.mm(dy, wd), gu)
        return torch.mm(dgu, wgu), i
    return fwd, bwd


def epilogue_rows(size: str, t: dict, rounds: int, calls: int) -> list[dict]:
    """mm vs addmm_ onto the output, per site, and c = extra time / a pass reading the output."""
    x, dy, wg, wd = t["x"], t["dy"], t["wg"], t["wd"]
    n, h = x.shape
    i = wg.shape[0]
    wgu = torch.cat([wg, t["wu"]])
    gu = torch.randn(n, 2 * i, device=x.device, dtype=x.dtype)
    sites = {"gate|up fwd": (x, wgu.t()), "down fwd": (gu[:, :i], wd.t()),
             "down bwd": (dy, wd), "gate|up bwd": (gu, wgu)}
    rows = []
    for site, (a, b) in sites.items():
        out = torch.mm(a, b)
        src = torch.empty_like(out)
        fns = {"mm": lambda: torch.mm(a, b, out=out), "addmm_": lambda: out.addmm_(a, b),
               "copy": lambda: src.copy_(out)}
        for f in fns.values():
            f()
        ts = common.interleaved({k: common.cuda_timer(f, calls) for k, f in fns.items()}, rounds)
        m = {k: common.median(v) for k, v in ts.items()}
        c = (m["addmm_"] - m["mm"]) / (m["copy"] / 2)
        rows.append(dict(size=size, site=site, M=a.shape[0], N=b.shape[1], K=a.shape[1], mm_ms=m["mm"],
                         addmm_ms=m["addmm_"], copy_ms=m["copy"], c=c))
        print(f"{size} {site:<12} mm {m['mm']:.4f}  addmm_ {m['addmm_']:.4f}  copy {m['copy']:.4f} ms  c {c:.2f}",
              flush=True)
    return rows


def node_rows(size: str, t: dict, rounds: int, calls: int) -> list[dict]:
    bf, bb = bound_fns(t)
    fns = {"bound fwd": bf, "bound bwd": bb}
    for name, f in FWD.items():
        fns["fwd " + name] = node_fns(t, f, (True, True))[0]
    for name, b in BWD.items():
        fns["bwd " + name] = node_fns(t, (True, True), b)[1]
    for f in fns.values():
        for _ in range(2):
            f()
    ts = common.interleaved({k: common.cuda_timer(f, calls) for k, f in fns.items()}, rounds)
    m = {k: common.median(v) for k, v in ts.items()}
    choice = fused.mlp_forms(t["x"].shape[0], t["wg"].shape[0], t["wg"].shape[1])
    rows = []
    for direction, table, bound, chosen in (("fwd", FWD, m["bound fwd"], choice[:2]),
                                            ("bwd", BWD, m["bound bwd"], choice[2:])):
        for name, f in table.items():
            ms = m[f"{direction} {name}"]
            rows.append(dict(size=size, direction=direction, forms=name, ms=ms, bound_ms=bound,
                             over_bound_us=(ms - bound) * 1e3, vs_merged=ms / m[f"{direction} merged"],
                             chosen=f == chosen))
            print(f"{size} {direction} {name:<15} {ms:.4f} ms  (bound {bound:.4f})  x merged "
                  f"{rows[-1]['vs_merged']:.3f}{'  <- mlp_forms' if f == chosen else ''}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = common.gemm_args(p).parse_args(argv)
    dtype = getattr(torch, args.dtype)
    r = int(args.r)
    erows, nrows = [], []
    for size in args.sizes.split(","):
        t = tensors(size, r, args.device, dtype)
        erows += epilogue_rows(size, t, args.rounds, args.calls)
        nrows += node_rows(size, t, args.rounds, args.calls)
        common.free(t)
    setup = (f"{args.dtype}, r={r}; median over {args.rounds} interleaved rounds of {args.calls} back-to-back "
             f"calls (CUDA events); tokens {', '.join(f'{s} {TOKENS[s]}' for s in args.sizes.split(','))}")
    common.report(erows, [("size", "size", ""), ("site", "site", ""), ("M", "M", ""), ("N", "N", ""),
                          ("K", "K", ""), ("mm_ms", "mm ms", "{:.4f}"), ("addmm_ms", "addmm_ ms", "{:.4f}"),
                          ("copy_ms", "copy of out ms", "{:.4f}"), ("c", "c (epilogue read / a read pass)", "{:.2f}")],
                  args.out and args.out + "_epilogue", args.device, "A GEMM's epilogue read of its output", setup)
    common.report(nrows, [("size", "size", ""), ("direction", "", ""), ("forms", "forms", ""), ("ms", "ms", "{:.4f}"),
                          ("bound_ms", "frozen ms", "{:.4f}"), ("over_bound_us", "over frozen us", "{:.0f}"),
                          ("vs_merged", "x merged", "{:.3f}"), ("chosen", "mlp_forms' choice", "")],
                  args.out, args.device, "The fused MLP's GEMM sites, merged or beside W0", setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
