"""The longest sequence each variant can train on: lorakit (with and without the fused loss)
vs the frozen-base bound vs PEFT, same model, batch and training step as bench/train_step.py.

For each variant the model is built once; then one training step (forward, loss, backward,
AdamW step: twice, so the optimizer state exists) is tried at growing sequence lengths,
doubling from ``--start`` until a step runs out of memory, then bisecting to ``--granularity``
tokens. A step that runs out of memory is cleaned up (gradients, caches) before the next try.
Reported per variant: the longest sequence that fits, its peak memory, and tokens/s of one
timed step there.

``--memory-gib`` caps what the process may allocate (torch.cuda.set_per_process_memory_fraction),
to ask the question for a smaller card on a large one.

    PYTHONPATH=. python bench/longest_seq.py --device cuda --size 1b --batch 8
    PYTHONPATH=. python bench/longest_seq.py --device cuda --size 8b --batch 1 --memory-gib 80
    PYTHONPATH=. python bench/longest_seq.py --device cpu --max-seq 256     # a smoke run (no OOM on CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common, train_step  # noqa: E402

VARIANTS = "bound,lorakit,lorakit+fused-loss,peft-bf16,peft"


def longest(fits: Callable[[int], bool], start: int, granularity: int, limit: int) -> Optional[int]:
    """The largest n (a multiple of ``granularity``, at most ``limit``) with fits(n), assuming
    fits is monotone (true up to some n, false beyond); None when not even ``start`` fits.

    Doubles from ``start`` until a failure (or ``limit``), then bisects between the last
    success and the first failure.
    """
    if not fits(start):
        return None
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, limit)
        if nxt <= lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def search(v: dict, args, dtype) -> dict:
    """Longest fitting sequence for variant ``v`` (a train_step.parse_variant dict)."""
    model = common.build_llama(args.size, args.device, dtype, seed=0, layers=args.layers)
    opt = train_step.setup(v, model)
    tried: dict[int, bool] = {}

    def try_step(seq: int, timed: bool = False) -> Optional[float]:
        ids, labels = common.random_batch(args.batch, seq, model.config.vocab_size, args.device)
        step, _ = train_step.make_step(v, model, opt, ids, labels)
        step()
        step()                                      # the optimizer state exists from the first
        common.sync(args.device)
        if not timed:
            return None
        t0 = time.perf_counter()
        step()
        common.sync(args.device)
        return time.perf_counter() - t0

    def fits(seq: int) -> bool:
        try:
            try_step(seq)
            ok = True
        except Exception as e:  # noqa: BLE001 - out of memory is the answer; anything else is re-raised
            if not _oom(e):
                raise
            ok = False
        model.zero_grad(set_to_none=True)
        common.free()
        tried[seq] = ok
        print(f"  {v['name']:<22} seq {seq:>7,}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    best = longest(fits, args.start, args.granularity, args.max_seq)
    row = dict(variant=v["name"], longest_seq=best, tried=len(tried))
    if best is not None:
        common.reset_peak(args.device)
        dt = try_step(best, timed=True)
        row.update(peak_gib=common.peak_gib(args.device), tokens_per_s=args.batch * best / dt)
    return row                                      # the model goes with this frame (main frees the cache)


COLUMNS = [("variant", "variant", ""), ("longest_seq", "longest seq", "{:,}"), ("x_bound", "x bound", "{:.2f}"),
           ("tokens", "tokens per step", "{:,}"), ("peak_gib", "peak GiB there", "{:.1f}"),
           ("tokens_per_s", "tokens/s there", "{:,.0f}"), ("tried", "steps tried", "")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, choices=sorted(common.SIZES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--start", type=int, default=1024, help="first sequence length tried")
    p.add_argument("--granularity", type=int, default=256)
    p.add_argument("--max-seq", type=int, default=131072)
    p.add_argument("--memory-gib", type=float, default=None, help="cap on what the process may allocate (CUDA)")
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--out", default=None, help="result stem (STEM.json, STEM.md)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size or ("smol" if cpu else "1b")
    args.batch = args.batch or (1 if cpu else 8)
    if cpu:
        args.start = min(args.start, args.max_seq)
    if args.memory_gib and not cpu:
        total = torch.cuda.get_device_properties(args.device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib / total))
    dtype = torch.float32 if cpu else torch.bfloat16
    rows = []
    for spec in args.variants.split(","):
        v = train_step.parse_variant(spec)
        if v["compile"]:
            raise SystemExit("compiled variants recompile at every length: not searched here")
        rows.append(search(v, args, dtype))
        common.free()
        print(rows[-1], flush=True)
    bound = next((r["longest_seq"] for r in rows if r["variant"] == "bound"), None)
    for r in rows:
        if r["longest_seq"] is not None:
            r["tokens"] = r["longest_seq"] * args.batch
            r["x_bound"] = r["longest_seq"] / bound if bound else None
    table = common.markdown_table(rows, COLUMNS)
    print(table)
    if args.out:
        meta = common.env_info(args.device)
        cap = f", allocations capped at {args.memory_gib:g} GiB" if args.memory_gib else ""
        meta.update(title=f"Longest training sequence, {args.size} shape, batch {args.batch}, {args.device}{cap}",
                    setup=(f"Llama shape `{args.size}`, {str(dtype).replace('torch.', '')}, LoRA r=16 alpha=32 on "
                           f"the 7 projections, AdamW; a length fits when two training steps run; doubling from "
                           f"{args.start}, then bisecting to {args.granularity} tokens (at most {args.max_seq})."))
        common.write_results(args.out, meta, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
