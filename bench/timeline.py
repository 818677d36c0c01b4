"""Where a GPU training step waits: one step's profiler trace, reduced to a few numbers per phase.

A step whose GPU time is close to the bound's but whose wall time is not is losing time to
*idle GPU*: the host has not launched the next kernel yet (it is slower than the GPU at that
point of the step), or it waits on a synchronisation. The profiler's kernel table cannot show
that; the trace's timestamps can.

``analyze(trace)`` takes a Chrome trace (``torch.profiler`` ``export_chrome_trace``) of one step
whose phases are marked with ``record_function("phase:NAME")`` (``bench/train_step.py`` marks
forward, backward and optimizer) and reports, per phase:

* ``host_ms``: the phase's duration on the host (the annotation);
* ``gpu_span_ms`` / ``gpu_busy_ms``: from the first to the last kernel the phase launched, and the
  union of those kernels' intervals;
* ``starved_ms``: idle gaps before kernels that started within ``slack_us`` of their launch call
  returning: the GPU was waiting on the host's launch, not on other work;

and the starved time by the host operations that launched the kernel after each gap (the
outermost profiler ranges around the launch, which name the autograd node in backward).

CLI: ``python bench/timeline.py TRACE.json`` prints the report.
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import defaultdict
from typing import Optional

KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _enclosing(ops: list[dict], starts: list[float], ts: float, tid, depth: int) -> str:
    """Names of the outermost ``depth`` host ranges on thread ``tid`` containing time ``ts``."""
    chain = []
    i = bisect.bisect_right(starts, ts)
    for op in reversed(ops[:i]):
        if op["tid"] == tid and op["ts"] <= ts <= op["ts"] + op.get("dur", 0):
            chain.append(op["name"])
    chain.reverse()                                  # outermost first
    return " > ".join(chain[:depth]) if chain else "(no range)"


def analyze(trace: dict, slack_us: float = 15.0, depth: int = 2, top: int = 12) -> dict:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in KERNEL_CATS]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    phases = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                     and str(e.get("name", "")).startswith("phase:")), key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")
                  and not str(e.get("name", "")).startswith("phase:")), key=lambda e: e["ts"])
    starts = [o["ts"] for o in ops]
    kernels.sort(key=lambda e: e["ts"])

    def phase_of(ts: float) -> Optional[str]:
        for p in phases:
            if p["ts"] <= ts <= p["ts"] + p["dur"]:
                return p["name"][len("phase:"):]
        return None

    per = defaultdict(lambda: dict(kernels=[], starved=0.0, gaps=0.0))
    by_op: dict[str, float] = defaultdict(float)
    prev_end = None
    for k in kernels:
        launch = launches.get(k.get("args", {}).get("correlation"))
        lts = launch["ts"] if launch else None
        name = phase_of(lts) if lts is not None else None
        rec = per[name or "(other)"]
        rec["kernels"].append((k["ts"], k["ts"] + k["dur"]))
        if prev_end is not None and k["ts"] > prev_end:
            gap = k["ts"] - prev_end
            rec["gaps"] += gap
            if launch is not None and k["ts"] - (launch["ts"] + launch["dur"]) <= slack_us:
                rec["starved"] += gap
                by_op[_enclosing(ops, starts, launch["ts"], launch["tid"], depth)] += gap
        prev_end = max(prev_end or k["ts"] + k["dur"], k["ts"] + k["dur"])
    out = {"phases": {}, "starved_by_op_ms": {}}
    for p in phases:
        name = p["name"][len("phase:"):]
        rec = per.get(name)
        ks = rec["kernels"] if rec else []
        out["phases"][name] = dict(
            host_ms=p["dur"] / 1e3, kernels=len(ks),
            gpu_span_ms=(max(e for _, e in ks) - min(s for s, _ in ks)) / 1e3 if ks else 0.0,
            gpu_busy_ms=_union_us(ks) / 1e3, idle_ms=rec["gaps"] / 1e3 if rec else 0.0,
            starved_ms=rec["starved"] / 1e3 if rec else 0.0)
    allk = [(k["ts"], k["ts"] + k["dur"]) for k in kernels]
    if allk and phases:
        out["step"] = dict(wall_ms=(max(e for _, e in allk) - phases[0]["ts"]) / 1e3,
                           gpu_busy_ms=_union_us(allk) / 1e3, kernels=len(allk))
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        out["starved_by_op_ms"][op] = us / 1e3
    return out


def report(res: dict, title: str = "") -> str:
    lines = [f"== timeline {title}".rstrip()]
    s = res.get("step")
    if s:
        lines.append(f"step: wall {s['wall_ms']:.1f} ms (from the first phase's start to the last kernel's end), "
                     f"GPU busy {s['gpu_busy_ms']:.1f} ms, {s['kernels']} kernels")
    lines.append(f"{'phase':<12} {'host ms':>8} {'kernels':>8} {'GPU span':>9} {'GPU busy':>9} {'idle':>7} {'starved':>8}")
    for name, p in res["phases"].items():
        lines.append(f"{name:<12} {p['host_ms']:8.1f} {p['kernels']:8d} {p['gpu_span_ms']:9.1f} "
                     f"{p['gpu_busy_ms']:9.1f} {p['idle_ms']:7.1f} {p['starved_ms']:8.1f}")
    if res["starved_by_op_ms"]:
        lines.append("GPU starved (waiting on a launch), by the host ranges around that launch:")
        lines += [f"  {ms:7.2f} ms  {op}" for op, ms in res["starved_by_op_ms"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        with open(path) as f:
            print(report(analyze(json.load(f)), path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
