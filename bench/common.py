"""Shared helpers for the side-by-side benchmarks (bench/train_step.py, bench/infer.py).

* ``SIZES``: the model shapes of issue 5 (Llama-shaped, random weights, never downloaded).
* ``build_llama``: a model built directly on its device in its final dtype.
* ``time_steps``: medians of synchronised wall-clock timings after warm-up.
* ``saved_bytes``: bytes of the distinct tensors autograd saves for backward in one step.
* ``env_info`` / ``write_results``: the JSON + markdown result files (GPU, versions, date).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Optional

import torch

TARGETS7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# hidden, layers, MLP width, heads, KV heads, vocabulary, tied head
SIZES = {
    "smol": dict(hidden=576, layers=16, inter=1536, heads=9, kv=3, vocab=49152, tie=True),
    "1b": dict(hidden=2048, layers=16, inter=8192, heads=32, kv=8, vocab=128256, tie=False),
    "8b": dict(hidden=4096, layers=32, inter=14336, heads=32, kv=8, vocab=128256, tie=False),
}


def build_llama(size, device: str, dtype: torch.dtype, seed: int = 0, layers: Optional[int] = None,
                use_cache: bool = False):
    """A LlamaForCausalLM of shape ``size`` (a SIZES name, or a dict with the same keys; "tie"
    defaults to False) with random weights, built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    s = SIZES[size] if isinstance(size, str) else size
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=layers or s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv"], max_position_embeddings=4096, tie_word_embeddings=s.get("tie", False),
                      attn_implementation="sdpa", use_cache=use_cache)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def random_batch(batch: int, seq: int, vocab: int, device: str, seed: int = 0):
    """(input ids, next-token labels): random ids (never zeros); the last label of each row is -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq + 1), generator=g)
    labels = ids[:, 1:].clone()
    return ids[:, :-1].contiguous().to(device), labels.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], device: str, warmup: int, iters: int,
               cpu_times: Optional[list] = None) -> list[float]:
    """Seconds per call of ``step`` (synchronised around each call), after ``warmup`` calls.
    ``cpu_times`` (a list), when given, receives the process CPU seconds of each call: near
    the wall time, the step is bound by the host, not the device."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def interleaved(measure: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """{name: [one value per round]}: every round takes each measurement once, in turn, the order
    reversed every other round (so no variant always runs first or after the same one)."""
    ts: dict[str, list[float]] = {n: [] for n in measure}
    for i in range(rounds):
        for n, m in (measure.items() if i % 2 == 0 else reversed(measure.items())):
            ts[n].append(m())
    return ts


def cuda_timer(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A measurement for ``interleaved``: ms per call of ``calls`` back-to-back calls of fn, CUDA events."""
    def measure() -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / calls
    return measure


def cuda_graph(fn: Callable[[], object], calls: int) -> "torch.cuda.CUDAGraph":
    """``calls`` back-to-back calls of fn captured in one CUDA graph (after 3 warm-up calls on the
    capturing stream, whose kernel buffers the capture then uses), replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_times(fns: dict, rounds: int, calls: int) -> dict:
    """{variant: median GPU ms per call}: ``calls`` back-to-back calls captured in one CUDA graph
    per variant (``cuda_graph``), replays timed with CUDA events, rounds interleaved."""
    graphs = {name: cuda_graph(f, calls) for name, f in fns.items()}
    ts = interleaved({n: cuda_timer(g.replay, 1) for n, g in graphs.items()}, rounds)
    return {n: median(v) / calls for n, v in ts.items()}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> Optional[float]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def saved_bytes(fn: Callable[[], torch.Tensor], model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, the storages of
    ``model``'s parameters and buffers excluded (weights are not activations).

    ``fn`` returns the loss; backward is run so the graph is freed. Views of one storage
    (x saved by q, k and v) count once.
    """
    seen: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in weights:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def free(*objs) -> None:
    """Drop references and return cached device memory (between variants)."""
    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def env_info(device: str) -> dict:
    """Versions, hardware and date recorded with every result file."""
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}
    for name in ("transformers", "peft", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an absent optional package is recorded as such
            info[name] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a markdown table; columns are (key, header, format) with format like '{:.2f}'."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def gemm_args(p, r_default="16"):
    """The options the GEMM-level H200 benchmarks share (append_gemm, small_gemm, rank_reduce)."""
    p.add_argument("--sizes", default="1b,8b")
    p.add_argument("--r", default=r_default, help="LoRA rank(s) per projection, comma-separated")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default=None)
    return p


def report(rows: list[dict], columns: list[tuple[str, str, str]], out: Optional[str], device: str,
           title: str, setup: str) -> None:
    """Print the markdown table of ``rows``; with ``out``, write it and the rows (``write_results``)."""
    table = markdown_table(rows, columns)
    print("\n" + table)
    if out:
        meta = env_info(device)
        meta.update(title=title, setup=setup)
        write_results(out, meta, rows, table)


def write_results(stem: str, meta: dict, rows: list[dict], table: str, notes: str = "") -> None:
    """``stem``.json (meta + rows) and ``stem``.md (a header with GPU/versions/date + the table)."""
    _atomic_write(stem + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    hw = meta.get("gpu") or f"CPU ({meta.get('threads')} threads)"
    head = (f"# {meta.get('title', os.path.basename(stem))}\n\n"
            f"{hw}; torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}"
            f"{', triton ' + meta['triton'] if meta.get('triton') else ''}; {meta['date']}.\n\n"
            f"Setup: {meta.get('setup', '')}\n\n")
    _atomic_write(stem + ".md", head + table + "\n" + (f"\n{notes}\n" if notes else ""))
