"""``lorakit demo digits``: the classic LoRA experiment, in under a minute on a laptop CPU.

An intentionally oversized MLP (64 -> 1000 -> 2000 -> 10, about 2.1M parameters) is
pretrained briefly on handwritten digits, then fine-tuned with a rank-1 LoRA adapter on
all three linear layers, on examples of the digit it gets most wrong, and only those::

    x (N, 64) -> linear1 (1000) -> ReLU -> linear2 (2000) -> ReLU -> linear3 (10) = logits
                 W0 frozen; each linear gets h = W0 x + b + (alpha / r) B A x, A (r, k), B (d, r)

What it shows, step by step: LoRA adds a fraction of a percent of parameters; the base
weights stay bit-identical; with the adapter the worst digit's errors drop sharply (and
other digits may get worse: the adapter saw one digit only); with the adapter disabled the
model is exactly the original (bit-identical logits); the adapter file is tiny next to the
model's weights.

Data (digit_data.py): scikit-learn's bundled 8x8 digits (1,797 images, no download), split per digit with
a seeded generator; or MNIST from the standard IDX files with ``--dataset mnist --data-dir``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError
from .digit_data import DatasetError, load_data


@dataclass
class DigitsConfig:
    """Settings of the experiment (the command-line flags of ``lorakit demo digits``)."""

    seed: int = 0
    """Seeds torch and the data split: two runs with the same seed print the same numbers."""
    pretrain_steps: int = 200
    """Adam steps of pretraining (deliberately brief, so some digit is clearly worst)."""
    steps: int = 100
    """Adam steps of LoRA fine-tuning on the worst digit's examples."""
    rank: int = 1
    """LoRA rank r on each linear layer."""
    alpha: Optional[float] = None
    """LoRA alpha (scale = alpha / r); default: equal to rank, so scale = 1."""
    lr: float = 1e-3
    """Adam learning rate, for pretraining and for fine-tuning."""
    batch_size: int = 10
    """Examples per step."""
    hidden: tuple = (1000, 2000)
    """Hidden layer widths of the MLP."""
    dataset: str = "digits"
    """"digits" (scikit-learn, bundled) or "mnist" (IDX files in data_dir)."""
    data_dir: Optional[str] = None
    """Folder with MNIST's IDX files (gzipped or not)."""
    out: str = "runs/digits"
    """Folder for the adapter, the base weights and the figure."""
    figure: bool = True
    """Save the PNG of wrong counts per digit."""
    progress: bool = True
    """Show tqdm progress bars (only on a terminal)."""
    threads: int = 1
    """torch CPU threads while the demo runs (restored afterwards). Batches of 10 rows are too
    small to gain from more, and one thread avoids OpenMP's spin-waits on a busy machine."""

    def __post_init__(self) -> None:
        problems = [f"--{n.replace('_', '-')} must be an integer >= {lo}, got {getattr(self, n)!r}"
                    for n, lo in (("pretrain_steps", 0), ("steps", 0), ("rank", 1), ("batch_size", 1), ("threads", 1))
                    if not isinstance(getattr(self, n), int) or getattr(self, n) < lo]
        if self.dataset not in ("digits", "mnist"):
            problems.append(f"--dataset must be 'digits' or 'mnist', got {self.dataset!r}")
        if self.dataset == "mnist" and not self.data_dir:
            problems.append("--dataset mnist needs --data-dir DIR (the folder with the IDX files)")
        if not self.hidden or any(h < 1 for h in self.hidden):
            problems.append(f"--hidden must list widths >= 1, got {self.hidden!r}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr!r}")
        if problems:
            raise ConfigError("lorakit demo digits: " + "; ".join(problems))


def build_mlp(n_in: int, hidden: tuple, n_out: int = 10):
    """The oversized MLP as a plain nn.Sequential: linear1, relu1, linear2, relu2, ..., linear{n}.

    x (N, n_in) -> ... -> logits (N, n_out)."""
    from collections import OrderedDict
    from torch import nn
    sizes = [n_in, *hidden, n_out]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), 1):
        layers.append((f"linear{i}", nn.Linear(a, b)))
        if i < len(sizes) - 1:
            layers.append((f"relu{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def train_steps(model, params, x, y, steps: int, cfg: DigitsConfig, desc: str, seed: int) -> float:
    """``steps`` Adam steps of cross-entropy on mini-batches drawn from (x, y) by seeded reshuffles;
    returns the last loss. Only ``params`` change."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    gen = torch.Generator().manual_seed(seed)
    opt = _adam(params, cfg.lr)
    order, pos, loss = torch.randperm(len(x), generator=gen), 0, torch.tensor(float("nan"))
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False,
               disable=not (cfg.progress and sys.stderr.isatty()))
    for _ in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = F.cross_entropy(model(x[idx]), y[idx])            # (B, 10) vs (B,)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    return float(loss.detach())


def _adam(params, lr: float):
    """Adam with the fused kernel where this torch has it (several times faster on CPU: one pass
    over the 2M parameters instead of about ten); the plain one otherwise. Both are deterministic."""
    import torch
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def evaluate(model, x, y):
    """(logits (N, 10), accuracy, wrong counts per true digit [10 ints])."""
    import torch
    model.eval()
    with torch.no_grad():
        logits = model(x)
    wrong = logits.argmax(-1) != y
    per_digit = torch.bincount(y[wrong], minlength=10).tolist()
    return logits, 1.0 - float(wrong.float().mean()), per_digit


def run_experiment(cfg: DigitsConfig, log: Callable[[str], None] = print) -> dict:
    """Run the seven steps; returns the summary (see docs/digits.md for every key).

    Deterministic for a given (seed, threads): torch.manual_seed, a seeded data split and
    seeded batch order."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _experiment(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _experiment(cfg: DigitsConfig, log: Callable[[str], None]) -> dict:
    import torch
    import lorakit
    from safetensors.torch import save as st_save
    from ..io import atomic_write_bytes
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"[1/7] Pretrain a {' -> '.join(map(str, [data.n_features, *cfg.hidden, 10]))} MLP on {data.name} "
        f"({len(data.x_train)} train / {len(data.x_test)} test examples), {cfg.pretrain_steps} steps")
    model = build_mlp(data.n_features, tuple(cfg.hidden))
    train_steps(model, list(model.parameters()), data.x_train, data.y_train, cfg.pretrain_steps, cfg,
                "pretrain", cfg.seed)
    logits_before, acc_before, wrong_before = evaluate(model, data.x_test, data.y_test)
    log(f"      test accuracy {acc_before:.2%}; wrong per digit: {_digits_line(wrong_before)}")

    worst = max(range(10), key=lambda d: (wrong_before[d], -d))
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    targets = [name for name, m in model.named_children() if name.startswith("linear")]
    log(f"\n[2/7] Worst digit: {worst} ({wrong_before[worst]} wrong). LoRA r={cfg.rank}, alpha={alpha:g} "
        f"on {', '.join(targets)}")
    originals = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]   # the copy to compare with
    lorakit.inject(model, lorakit.LoraConfig(r=cfg.rank, alpha=alpha, target_modules=targets))
    report = lorakit.parameter_report(model)
    log(str(report))
    log(f"      original parameters {report.base:,}; LoRA adds {report.lora:,} "
        f"(+{100.0 * report.lora / report.base:.3f}%); trainable {report.trainable:,}")

    mask = data.y_train == worst
    if not bool(mask.any()):
        raise DatasetError(f"{data.name}: the training split has no example of digit {worst} to fine-tune on")
    log(f"\n[3/7] Fine-tune only A and B on the {int(mask.sum())} training examples of digit {worst}, "
        f"{cfg.steps} steps")
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = train_steps(model, trainable, data.x_train[mask], data.y_train[mask], cfg.steps, cfg, "LoRA",
                       cfg.seed + 1)
    log(f"      last loss {loss:.4f}")

    unchanged = all(torch.equal(p, copy) for _, p, copy in originals)
    still_in_model = {id(p) for p in model.parameters()} >= {id(p) for _, p, _ in originals}
    base_unchanged = unchanged and still_in_model
    log(f"\n[4/7] Base weights bit-identical to the copy taken before fine-tuning: {base_unchanged} "
        f"({len(originals)} tensors compared)")

    _, acc_lora, wrong_lora = evaluate(model, data.x_test, data.y_test)
    with lorakit.disable_adapters(model):
        logits_off, acc_off, wrong_off = evaluate(model, data.x_test, data.y_test)
    identical = torch.equal(logits_off, logits_before) and wrong_off == wrong_before
    log(f"\n[5/7] With LoRA:     accuracy {acc_lora:.2%}; wrong per digit: {_digits_line(wrong_lora)}")
    log(f"      LoRA disabled: accuracy {acc_off:.2%}; wrong per digit: {_digits_line(wrong_off)}")
    log(_lesson(worst, wrong_before, wrong_lora, identical))

    base_file = out / "base_model.safetensors"
    atomic_write_bytes(base_file, st_save({n: c.contiguous() for n, _, c in originals}))
    adapter_dir = lorakit.save_adapter(model, out / "adapter", base_model_name_or_path=str(base_file))
    adapter_file = adapter_dir / "adapter_model.safetensors"
    adapter_bytes, model_bytes = adapter_file.stat().st_size, base_file.stat().st_size
    log(f"\n[6/7] Adapter saved to {adapter_dir}: {_size(adapter_bytes)} "
        f"vs {_size(model_bytes)} for the full model's weights ({base_file}), {model_bytes / adapter_bytes:.0f}x "
        "smaller")

    figure = None
    if cfg.figure:
        figure = plot_errors(wrong_before, wrong_lora, worst, out / "digits_errors.png",
                             f"{data.name}: wrong per digit, LoRA r={cfg.rank} on digit {worst}")
        log(f"\n[7/7] Figure: {figure}")
    else:
        log("\n[7/7] Figure skipped (--no-figure)")
    seconds = time.perf_counter() - t0
    log(f"\nDone in {seconds:.1f} s.")
    return {
        "base_accuracy": acc_before, "per_digit_errors_before": wrong_before, "worst_digit": worst,
        "per_digit_errors_after": wrong_lora, "lora_accuracy": acc_lora, "disabled_accuracy": acc_off,
        "per_digit_errors_disabled": wrong_off, "disabled_identical": identical,
        "base_weights_unchanged": base_unchanged, "trainable_params": report.trainable,
        "total_params": report.total, "base_params": report.base, "lora_params": report.lora,
        "lora_percent": 100.0 * report.lora / report.base, "adapter_bytes": adapter_bytes,
        "model_bytes": model_bytes, "final_loss": loss, "seconds": seconds, "config": _config_dict(cfg),
        "adapter_path": str(adapter_dir), "model_path": str(base_file),
        "figure_path": None if figure is None else str(figure),
    }


def _config_dict(cfg: DigitsConfig) -> dict:
    d = asdict(cfg)
    d["hidden"] = list(cfg.hidden)
    return d


def _digits_line(wrong: list) -> str:
    return "  ".join(f"{d}:{w}" for d, w in enumerate(wrong)) + f"  (total {sum(wrong)})"


def _lesson(worst: int, before: list, after: list, identical: bool) -> str:
    worse = [f"{d} ({before[d]} -> {after[d]})" for d in range(10) if d != worst and after[d] > before[d]]
    lines = [f"      Digit {worst}: {before[worst]} -> {after[worst]} wrong with the adapter."]
    if worse:
        lines.append(f"      Other digits got worse: {', '.join(worse)}. Expected: the adapter was trained on "
                     f"digit {worst} alone, so it pulls other inputs towards {worst}. Keep it for that job "
                     "and switch it off (or to another adapter) for the rest.")
    lines.append(f"      Disabled adapter = original model, bit-identical logits: {identical}")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def plot_errors(before: list, after: list, worst: int, path: Path, title: str) -> Path:
    """Bar chart of wrong counts per digit, original vs LoRA-enabled; saved as PNG (Agg, no pyplot)."""
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from ..io import atomic_write_bytes
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = range(10)
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="original", color="#888888")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label=f"LoRA on digit {worst}", color="#d9534f")
    ax.set(xticks=list(xs), xlabel="true digit", ylabel="wrong predictions (test set)", title=title)
    ax.get_xticklabels()[worst].set_fontweight("bold")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------ command line
def add_arguments(parser) -> None:
    d = DigitsConfig()
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for torch and the data split (default 0)")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"LoRA fine-tuning steps (default {d.steps})")
    parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                        help=f"pretraining steps (default {d.pretrain_steps})")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r (default 1)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank, scale 1)")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (default 10)")
    parser.add_argument("--hidden", default=",".join(map(str, d.hidden)),
                        help="hidden widths, comma separated (default 1000,2000)")
    parser.add_argument("--dataset", choices=("digits", "mnist"), default=d.dataset,
                        help="digits: scikit-learn's bundled 8x8 digits (default); mnist: IDX files in --data-dir")
    parser.add_argument("--data-dir", default=None, help="folder with MNIST's IDX files (gzipped or not)")
    parser.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    parser.add_argument("--json", default=None, metavar="PATH", help="write a machine-readable summary here")
    parser.add_argument("--no-figure", action="store_true", help="do not write the PNG figure")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors; no progress bars")


def config_from_args(args) -> DigitsConfig:
    try:
        hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated integers, got {args.hidden!r}") from None
    return DigitsConfig(seed=args.seed, pretrain_steps=args.pretrain_steps, steps=args.steps, rank=args.rank,
                        alpha=args.alpha, lr=args.lr, batch_size=args.batch_size, hidden=hidden,
                        dataset=args.dataset, data_dir=args.data_dir, out=args.out,
                        figure=not args.no_figure, progress=not args.quiet, threads=args.threads)


def run(args) -> int:
    cfg = config_from_args(args)
    summary = run_experiment(cfg, log=(lambda s: None) if args.quiet else print)
    if args.json:
        from ..io import atomic_write_bytes
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
        if not args.quiet:
            print(f"Summary: {path}")
    return 0 if summary["disabled_identical"] and summary["base_weights_unchanged"] else 1
