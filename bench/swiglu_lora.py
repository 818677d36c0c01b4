"""Can the SwiGLU kernels add the LoRA terms at the plain kernels' speed? (experiment)

Beside W0, the fused MLP writes the rank-r products into g|u (N, 2I) and into dh (N, I) before
the big GEMMs accumulate onto them (``lorakit.fused.mlp_forms``): at the 8B shape these writes
are the largest passes the MLP adds. The activation kernels read g, u and dh anyway, so they
could add the terms themselves:

    g = g0 + sg (x Ag^T) Bg^T      u = u0 + su (x Au^T) Bu^T      dh = dh0 + sd (dY Bd) Ad

Two tiled versions ran slower than the plain kernels by 40-470 us a call and were removed
(``docs/performance.md``: the ``tl.dot`` version loaded g and u as 2-byte scalars in the dot's
layout at 167 registers; the outer-product version held 255). This one keeps the plain kernel's
shape: ROWS rows x BLOCK contiguous columns per program (16-byte loads of g, u, dh), and adds
the terms by a loop over the rank that is not unrolled (one 16-byte load of B^T's row and ROWS
scalars of x A^T per step), so registers stay bounded.

Result (``swiglu_lora_h200.md``, session 8): it too lost, by 270-870 us a call (1B forward
377 us at best against the plain kernel's 99 us). Added on the CUDA cores, the r multiply-adds
per element are 4.3 GFLOP at 1B, 64 us at the H200's float32 peak: about what the tensor-core
GEMM writes it would spare cost, so this direction is closed without explicit layouts (Gluon).

* ``--aot``: no GPU needed. Compiles every configuration for sm_90 (Triton's bundled ptxas),
  with the pointer alignment the device specializes on, and reports registers, stack and the
  global loads per thread, against the plain kernels.
* otherwise (CUDA): checks each configuration against a float32 reference, then times it, the
  plain kernel, and the GEMMs the kernel would replace (``torch.addmm`` writing s (x A^T) B^T),
  as medians of CUDA-graph replays.

    PYTHONPATH=. python bench/swiglu_lora.py --aot
    PYTHONPATH=. python bench/swiglu_lora.py --out bench/results/swiglu_lora_h200
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:                                          # pragma: no cover - CPU-only installs
    triton = tl = None

SHAPES = {"1b": (8192, 8192), "8b": (4096, 14336)}          # (N tokens, I)
CONFIGS = [(2, 1024, 8), (4, 1024, 8), (8, 512, 8), (16, 256, 8), (16, 512, 8), (32, 256, 8)]   # (ROWS, BLOCK, warps)


if triton is not None:
    @triton.jit
    def _add_lowrank(acc, a_ptr, s_a, bt_ptr, s_bt, rows, cols, mr, mc, scale, R: tl.constexpr):
        """acc (ROWS, BLOCK) + scale a[rows, :R] bt[:R, cols], one rank per loop step (not unrolled)."""
        for k in tl.range(0, R, loop_unroll_factor=1):
            av = tl.load(a_ptr + rows * s_a + k, mask=mr, other=0.0).to(tl.float32)
            bv = tl.load(bt_ptr + k * s_bt + cols, mask=mc, other=0.0).to(tl.float32)
            acc += (scale * av)[:, None] * bv[None, :]
        return acc

    @triton.jit
    def _gate_up(gu_ptr, bt_ptr, rows, cols, mr, mc, m, I, s_gu, s_bt, sg, su, RG: tl.constexpr, RU: tl.constexpr):
        """(g, u) float32 tiles: g0, u0 from gu = [g0 | u0 | xag | xau] plus their low-rank terms."""
        off = rows[:, None] * s_gu + cols[None, :]
        g = tl.load(gu_ptr + off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + off + I, mask=m, other=0.0).to(tl.float32)
        g = _add_lowrank(g, gu_ptr + 2 * I, s_gu, bt_ptr, s_bt, rows, cols, mr, mc, sg, RG)
        u = _add_lowrank(u, gu_ptr + 2 * I + RG, s_gu, bt_ptr + RG * s_bt, s_bt, rows, cols, mr, mc, su, RU)
        return g, u

    @triton.jit
    def _fwd_kernel(gu_ptr, bt_ptr, h_ptr, N, I, s_gu, s_bt, s_h, sg, su,
                    RG: tl.constexpr, RU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """h = silu(g) u with g = g0 + sg xag Bg^T, u = u0 + su xau Bu^T; gu = [g0 | u0 | xag | xau],
        bt = [Bg^T; Bu^T] (RG + RU, I)."""
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mr, mc = rows < N, cols < I
        m = mr[:, None] & mc[None, :]
        g, u = _gate_up(gu_ptr, bt_ptr, rows, cols, mr, mc, m, I, s_gu, s_bt, sg, su, RG, RU)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_kernel(dh_ptr, gd_ptr, ad_ptr, gu_ptr, bt_ptr, dgu_ptr, N, I, s_dh, s_gd, s_ad, s_gu, s_bt, s_dgu,
                    sd, sg, su, RD: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr):
        """[dg | du] and h (over dh) with dh = dh0 + sd gd Ad and g, u rebuilt as the forward does."""
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mr, mc = rows < N, cols < I
        m = mr[:, None] & mc[None, :]
        off_dh = rows[:, None] * s_dh + cols[None, :]
        dh = tl.load(dh_ptr + off_dh, mask=m, other=0.0).to(tl.float32)
        dh = _add_lowrank(dh, gd_ptr, s_gd, ad_ptr, s_ad, rows, cols, mr, mc, sd, RD)
        g, u = _gate_up(gu_ptr, bt_ptr, rows, cols, mr, mc, m, I, s_gu, s_bt, sg, su, RG, RU)
        s = tl.sigmoid(g)
        silu = g * s
        ty = dgu_ptr.dtype.element_ty
        o = rows[:, None] * s_dgu + cols[None, :]
        tl.store(dgu_ptr + o, (dh * u * s * (1.0 + g * (1.0 - s))).to(ty), mask=m)
        tl.store(dgu_ptr + o + I, (dh * silu).to(ty), mask=m)
        tl.store(dh_ptr + off_dh, (silu * u).to(dh_ptr.dtype.element_ty), mask=m)


def forward(gu, bt, rg, sg, su, cfg):
    """h (N, I) for gu = [g0 | u0 | xag | xau] and bt = [Bg^T; Bu^T] (the kernel)."""
    rows, block, warps = cfg
    n, i = gu.shape[0], bt.shape[1]
    h = torch.empty((n, i), dtype=gu.dtype, device=gu.device)
    _fwd_kernel[(triton.cdiv(n, rows), triton.cdiv(i, block))](
        gu, bt, h, n, i, gu.stride(0), bt.stride(0), h.stride(0), sg, su,
        RG=rg, RU=bt.shape[0] - rg, ROWS=rows, BLOCK=block, num_warps=warps)
    return h


def backward(dh, gd, ad, sd, gu, bt, rg, sg, su, cfg):
    """[dg | du] (N, 2I); dh is overwritten with h (the kernel)."""
    rows, block, warps = cfg
    n, i = dh.shape
    dgu = torch.empty((n, 2 * i), dtype=gu.dtype, device=gu.device)
    _bwd_kernel[(triton.cdiv(n, rows), triton.cdiv(i, block))](
        dh, gd, ad, gu, bt, dgu, n, i, dh.stride(0), gd.stride(0), ad.stride(0), gu.stride(0), bt.stride(0),
        dgu.stride(0), sd, sg, su, RD=ad.shape[0], RG=rg, RU=bt.shape[0] - rg, ROWS=rows, BLOCK=block,
        num_warps=warps)
    return dgu


def reference(gu, bt, rg, sg, su, dh=None, gd=None, ad=None, sd=1.0):
    """(h, [dg | du]) in float32: the same math in plain PyTorch (``dh`` None: forward only)."""
    i = bt.shape[1]
    xa, btf = gu[:, 2 * i:].float(), bt.float()
    g = gu[:, :i].float() + sg * xa[:, :rg] @ btf[:rg]
    u = gu[:, i:2 * i].float() + su * xa[:, rg:] @ btf[rg:]
    s = torch.sigmoid(g)
    h = g * s * u
    if dh is None:
        return h, None
    d = dh.float() + sd * gd.float() @ ad.float()
    return h, torch.cat([d * u * s * (1 + g * (1 - s)), d * g * s], dim=1)


def inputs(n, i, r, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, device=device, generator=g) * std).to(dtype)
    return dict(gu=rnd(n, 2 * i + 2 * r, std=2.0), bt=rnd(2 * r, i, std=0.3), dh=rnd(n, i), gd=rnd(n, r),
                ad=rnd(r, i, std=0.3))


def compile_sm90(fn, sig: dict, constexprs: dict, warps: int, aligned, stages: int = 3) -> dict:
    """Compile a Triton kernel for sm_90 here (no GPU), the arguments numbered in ``aligned``
    specialized as multiples of 16 as on the device; its registers, stack bytes and global loads
    per thread (all, and 16-byte ones) from Triton's bundled cuobjdump and the PTX."""
    import subprocess
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    attrs = {(k,): [["tt.divisibility", 16]] for k in aligned}
    kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lorakit_aot_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(kern.asm["cubin"])
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    os.unlink(path)
    fields = dict(p.split(":") for p in next(ln for ln in usage.splitlines() if "REG:" in ln).split())
    ptx = kern.asm["ptx"]
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]), loads=ptx.count("ld.global"),
                loads_16B=ptx.count("ld.global.v4"), async_16B=len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*0x10", ptx)))


def aot_rows(r: int) -> list[dict]:
    """Registers, stack and global loads per thread of each configuration, compiled for sm_90 here,
    every pointer and integer argument specialized as a multiple of 16 (as at the 1B and 8B shapes)."""
    from lorakit.kernels import swiglu
    compile_ = compile_sm90
    i32, f32, b16 = "i32", "fp32", "*bf16"
    plain_f = dict(gu_ptr=b16, h_ptr=b16, I=i32, s_gu=i32, s_h=i32, BLOCK="constexpr")
    plain_b = dict(dh_ptr=b16, gu_ptr=b16, dgu_ptr=b16, I=i32, s_dh=i32, s_gu=i32, s_dgu=i32, BLOCK="constexpr")
    fwd = dict(gu_ptr=b16, bt_ptr=b16, h_ptr=b16, N=i32, I=i32, s_gu=i32, s_bt=i32, s_h=i32, sg=f32, su=f32,
               RG="constexpr", RU="constexpr", ROWS="constexpr", BLOCK="constexpr")
    bwd = dict(dh_ptr=b16, gd_ptr=b16, ad_ptr=b16, gu_ptr=b16, bt_ptr=b16, dgu_ptr=b16, N=i32, I=i32, s_dh=i32,
               s_gd=i32, s_ad=i32, s_gu=i32, s_bt=i32, s_dgu=i32, sd=f32, sg=f32, su=f32, RD="constexpr",
               RG="constexpr", RU="constexpr", ROWS="constexpr", BLOCK="constexpr")
    rows = [dict(kernel="plain fwd", config="1 x 1024, 4 warps",
                 **compile_(swiglu._fwd_kernel, plain_f, dict(BLOCK=swiglu.BLOCK), 4, range(5))),
            dict(kernel="plain bwd", config="1 x 1024, 4 warps",
                 **compile_(swiglu._bwd_kernel, plain_b, dict(BLOCK=swiglu.BLOCK), 4, range(7)))]
    for rows_, block, warps in CONFIGS:
        name = f"{rows_} x {block}, {warps} warps"
        cex = dict(RG=r, RU=r, ROWS=rows_, BLOCK=block)
        rows.append(dict(kernel="lora fwd", config=name, **compile_(_fwd_kernel, fwd, cex, warps, range(8))))
        rows.append(dict(kernel="lora bwd", config=name,
                         **compile_(_bwd_kernel, bwd, dict(RD=r, **cex), warps, range(14))))
    for row in rows:
        print(f"{row['kernel']:<10} {row['config']:<20} registers {row['registers']:>3}  stack {row['stack']:>5}  "
              f"global loads {row['loads']:>4} (16-byte {row['loads_16B']})", flush=True)
    return rows


def gpu_rows(sizes: list[str], r: int, rounds: int, calls: int) -> list[dict]:
    """Correctness against ``reference``, then medians of CUDA-graph replays per call."""
    from lorakit.kernels import swiglu
    rows = []
    for size in sizes:
        n, i = SHAPES[size]
        t = inputs(n, i, r, "cuda")
        gu, bt, gd, ad = t["gu"], t["bt"], t["gd"], t["ad"]
        want_h, want_dgu = reference(gu, bt, r, 0.7, 1.3, t["dh"], gd, ad, 2.0)
        xa = gu[:, 2 * i:]
        t_out = torch.empty((n, 2 * i), dtype=gu.dtype, device="cuda")
        dh_out = torch.empty((n, i), dtype=gu.dtype, device="cuda")
        fns = {"plain fwd": lambda: swiglu.swiglu_forward(gu[:, :2 * i]),
               "plain bwd": lambda: swiglu.swiglu_backward(t["dh"].clone(), gu[:, :2 * i]),
               "GEMMs writing the terms, fwd": lambda: (
                   torch.addmm(t_out[:, :i], xa[:, :r], bt[:r], beta=0, alpha=0.7, out=t_out[:, :i]),
                   torch.addmm(t_out[:, i:], xa[:, r:], bt[r:], beta=0, alpha=1.3, out=t_out[:, i:])),
               "GEMM writing the term, bwd": lambda: torch.addmm(dh_out, gd, ad, beta=0, alpha=2.0, out=dh_out),
               "clone of dh": lambda: t["dh"].clone()}
        for cfg in CONFIGS:
            h = forward(gu, bt, r, 0.7, 1.3, cfg)
            dh = t["dh"].clone()
            dgu = backward(dh, gd, ad, 2.0, gu, bt, r, 0.7, 1.3, cfg)
            for got, want in ((h, want_h), (dgu, want_dgu), (dh, want_h)):
                err = ((got.float() - want).norm() / want.norm()).item()
                assert err < 1e-2, (size, cfg, err)
            fns[f"lora fwd {cfg}"] = lambda cfg=cfg: forward(gu, bt, r, 0.7, 1.3, cfg)
            fns[f"lora bwd {cfg}"] = lambda cfg=cfg: backward(t["dh"].clone(), gd, ad, 2.0, gu, bt, r, 0.7, 1.3, cfg)
        med = {k: ms * 1e3 for k, ms in common.graph_times(fns, rounds, calls).items()}
        clone = med.pop("clone of dh")
        for k in ("plain bwd",) + tuple(k for k in med if k.startswith("lora bwd")):
            med[k] -= clone                                 # the benchmark's copy of dh, not the kernel's work
        for k, us in med.items():
            base = med["plain fwd" if "fwd" in k else "plain bwd"]
            rows.append(dict(size=size, N=n, I=i, r=r, variant=k, us=us, over_plain_us=us - base))
            print(f"{size} {k:<32} {us:8.1f} us  (+{us - base:.1f} over the plain kernel)", flush=True)
        common.free(t)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aot", action="store_true", help="compile for sm_90 here and report resources (no GPU)")
    p.add_argument("--sizes", default="1b,8b")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if triton is None:
        raise SystemExit("bench/swiglu_lora.py needs Triton")
    if args.aot:
        rows = aot_rows(args.r)
        cols = [("kernel", "kernel", ""), ("config", "rows x columns, warps", ""), ("registers", "registers", ""),
                ("stack", "stack bytes", ""), ("loads", "global loads / thread", ""), ("loads_16B", "of them 16-byte", "")]
        common.report(rows, cols, args.out, "cpu", "SwiGLU with LoRA terms: resources, compiled for sm_90",
                      f"r={args.r}; Triton {triton.__version__}, its bundled ptxas; pointers and integers multiples of 16")
        return 0
    rows = gpu_rows(args.sizes.split(","), args.r, args.rounds, args.calls)
    cols = [("size", "size", ""), ("N", "N", ""), ("I", "I", ""), ("r", "r", ""), ("variant", "variant", ""),
            ("us", "us per call", "{:.1f}"), ("over_plain_us", "over the plain kernel", "{:.1f}")]
    common.report(rows, cols, args.out, "cuda", "SwiGLU with LoRA terms in the kernel vs the plain kernel",
                  f"bfloat16, r={args.r}; medians of {args.rounds} interleaved CUDA-graph replays of {args.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
