import sys, torch
sys.path.insert(0, '.')
from bench import common
from bench.append_gemm import time_cases
dt = torch.bfloat16
def sites(size, N, r):
    s = common.SIZES[size]; h, kv, m = s["hidden"], s["hidden"]//s["heads"]*s["kv"], s["inter"]
    # (name, N, d_out of the stacked linear, k_in, r_total)
    return [("qkv", N, h+2*kv, h, 3*r), ("o", N, h, h, r), ("gu", N, 2*m, h, 2*r), ("down", N, h, m, r)]
for size, N in (("1b", 8192), ("8b", 4096)):
  for r in (16,):
    for name, N, d, k, R in sites(size, N, r):
        g = torch.Generator(device="cuda").manual_seed(0)
        rn = lambda *s: torch.randn(*s, device="cuda", dtype=dt, generator=g)
        x, dy, A, B, xa, gs = rn(N, k), rn(N, d), rn(R, k), rn(d, R), rn(N, R), rn(N, R)
        fns = {"xa=x@A^T": lambda: torch.mm(x, A.t()),
               "gs=dY@B": lambda: torch.mm(dy, B),
               "dA=gs^T@x": lambda: torch.mm(gs.t(), x),
               "dA'=(x^T@gs)^T": lambda: torch.mm(x.t(), gs),
               "dB=addmm(dY^T,xa)": lambda: torch.addmm(B, dy.t(), xa, beta=0, alpha=2.0),
               "dB'=(xa^T@dY)^T": lambda: torch.mm(xa.t(), dy),
               "copy dY": lambda: dy.clone(),
               "copy x": lambda: x.clone()}
        t = time_cases(fns, 30, 10)
        big = {"xa=x@A^T": x, "dA=gs^T@x": x, "dA'=(x^T@gs)^T": x, "gs=dY@B": dy, "dB=addmm(dY^T,xa)": dy, "dB'=(xa^T@dY)^T": dy, "copy dY": dy, "copy x": x}
        for n, ms in t.items():
            b = big[n].numel()*2*(2 if n.startswith("copy") else 1)
            print(f"{size} {name:5} N={N} d={d} k={k} R={R} {n:22} {ms*1e3:8.1f} us  {b/ms/1e9:6.2f} TB/s", flush=True)
