"""``lorakit analyze --base A [--tuned B]``: how low-rank is a fine-tune's update?

Per layer: shape, full rank min(d, k), numerical rank and effective rank (90% / 99% of the
energy) of dW = W_tuned - W_base, and the relative error of its best rank-r approximation
for r in --ranks. Prints a table, writes a PNG of the singular value spectra, and with
--json the numbers. Without --tuned, the weights themselves are analysed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--base", required=True, help="base checkpoint: .safetensors file, folder of them, "
                        "or Hugging Face model folder")
    parser.add_argument("--tuned", default=None, help="fine-tuned checkpoint of the same architecture "
                        "(omit to analyse the base weights themselves)")
    parser.add_argument("--ranks", default="1,4,16,64", help="ranks r for the relative error (default 1,4,16,64)")
    parser.add_argument("--thresholds", default="0.9,0.99",
                        help="energy thresholds for the effective rank (default 0.9,0.99)")
    parser.add_argument("--include", default=None, metavar="REGEX", help="only layers whose path matches (re.search)")
    parser.add_argument("--exclude", default=None, metavar="REGEX", help="skip layers whose path matches")
    parser.add_argument("--png", default="spectra.png", help="PNG of the spectra (default spectra.png)")
    parser.add_argument("--no-png", action="store_true", help="do not write the PNG")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the per-layer numbers as JSON")
    parser.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, ...; default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")


def parse_list(text: str, kind, flag: str) -> list:
    """'1,4,16' -> [1, 4, 16]; a ConfigError naming the flag otherwise."""
    from ..errors import ConfigError
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{flag} must be a comma-separated list of {kind.__name__} values, got {text!r}")
    return values


def format_table(head: tuple, rows: list) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*map(str, r)) for r in rows])


def table(layers, ranks, thresholds, with_update: bool) -> str:
    head = ("layer", "kind", "shape", "full rank", "num. rank", *[f"eff@{t:g}" for t in thresholds],
            *[f"err@r={r}" for r in ranks]) + (("|dW|/|W|",) if with_update else ())
    rows = [(x.name, x.kind, "x".join(map(str, x.shape)), x.full_rank, x.numerical_rank,
             *[x.effective_rank[t] for t in thresholds], *[f"{x.relative_error[r]:.3g}" for r in ranks])
            + ((f"{x.relative_norm:.3g}",) if with_update else ()) for x in layers]
    return format_table(head, rows)


def run(args) -> int:
    from .. import analysis
    from ..errors import ConfigError
    ranks = parse_list(args.ranks, int, "--ranks")
    thresholds = parse_list(args.thresholds, float, "--thresholds")
    if any(r < 1 for r in ranks) or any(not 0 < t <= 1 for t in thresholds):
        raise ConfigError(f"--ranks must be >= 1 and --thresholds in (0, 1], got {ranks} and {thresholds}")
    quiet = args.quiet
    base = analysis.load_checkpoint(args.base)
    tuned = analysis.load_checkpoint(args.tuned) if args.tuned else None
    layers = analysis.analyze(base, tuned, ranks, thresholds, args.include, args.exclude, args.device,
                              progress=not quiet and sys.stderr.isatty())
    if not layers:
        raise ConfigError(f"no 2-D weight of {base.source} matches --include {args.include!r} / "
                          f"--exclude {args.exclude!r}")
    what = f"update {tuned.source} - {base.source}" if tuned else f"weights of {base.source}"
    others = analysis.changed_others(base, tuned, [x.name for x in layers]) if tuned else []
    if not quiet:
        print(f"Rank analysis of the {what}: {len(layers)} layers")
        print(table(layers, ranks, thresholds, tuned is not None))
        print(summary(layers, thresholds))
        if others:
            print(f"{len(others)} other tensors changed too (biases, norms, ...; not analysed): "
                  + ", ".join(others[:8]) + (" ..." if len(others) > 8 else ""))
    if not args.no_png:
        png = plot_spectra(layers, args.png, f"singular values of the {'update' if tuned else 'weights'}")
        if not quiet:
            print(f"Spectra: {png}")
    if args.json:
        from ..io import atomic_write_bytes
        doc = {"base": base.source, "tuned": tuned.source if tuned else None, "ranks": ranks,
               "thresholds": thresholds, "layers": [x.to_dict() for x in layers], "other_changed": others}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
        if not quiet:
            print(f"JSON: {path}")
    return 0


def summary(layers, thresholds) -> str:
    """One line per threshold: the median and largest effective rank over the layers."""
    out = []
    for t in thresholds:
        ranks = sorted(x.effective_rank[t] for x in layers)
        out.append(f"effective rank at {t:g} energy: median {ranks[len(ranks) // 2]}, max {ranks[-1]} "
                   f"(of full rank up to {max(x.full_rank for x in layers)})")
    return "\n".join(out)


def plot_spectra(layers, path, title: str = "") -> Path:
    """Save a PNG: normalised singular values s_i / s_1 (log scale) and cumulative energy per layer.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global backend change)."""
    import io as _io
    import matplotlib
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from ..analysis import energy
    from ..io import atomic_write_bytes
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    few = 0 < len(layers) <= 12
    for i, layer in enumerate(layers):
        s = layer.singular_values.double()
        if s.numel() == 0 or float(s[0]) == 0.0:
            continue
        color, label = cmap(i / max(len(layers) - 1, 1)), (layer.name if few else None)
        r = torch.arange(1, s.numel() + 1).numpy()
        ax1.plot(r, (s / s[0]).clamp_min(1e-12).numpy(), color=color, lw=1, label=label)
        ax2.plot(r, energy(s).numpy(), color=color, lw=1, label=label)
    for thr in (0.9, 0.99):
        ax2.axhline(thr, color="gray", ls="--", lw=0.8)
    ax1.set(xlabel="index i", ylabel="s_i / s_1", title="singular value spectra", xscale="log", yscale="log")
    ax2.set(xlabel="rank r", ylabel="energy kept", title="cumulative energy", xscale="log", ylim=(0, 1.02))
    if few:
        ax2.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
