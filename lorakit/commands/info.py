"""``lorakit info DIR``: what an adapter folder holds, without loading any model.

    lorakit info runs/sql/adapter       # an adapter folder (PEFT layout)
    lorakit info runs/sql               # a training run: its adapter/ and the run's summary
    lorakit info runs/sql --json

Prints the base model, the adapter config, rank / alpha / scale of every adapted layer,
the trainable parameter count, the file size and the target modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="DIR", help="an adapter folder, or a training run's output folder")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.add_argument("--layers", type=int, default=40, help="show at most this many layer rows (0: all)")


def run(args) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info, args.layers))
    return 0


def find_adapter_folder(path: str | Path) -> Path:
    """``path`` itself when it holds adapter_config.json, else its ``adapter/`` subfolder."""
    from ..io import CONFIG_NAME
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter"
    if not p.exists():
        raise AdapterFormatError(f"{p}: no such folder")
    raise AdapterFormatError(f"{p}: no {CONFIG_NAME} here or in {p / 'adapter'}; pass an adapter folder "
                             "(lorakit train writes one to <out-dir>/adapter)")


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``lorakit info`` shows, as a dict."""
    from ..io import find_adapter_files, read_config, read_tensors
    folder = find_adapter_folder(path)
    config_file, weights_file = find_adapter_files(folder)
    cfg = read_config(config_file)
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    tensors = read_tensors(weights_file)
    layers: dict[str, dict[str, Any]] = {}
    saved_params = 0
    for key, t in sorted(tensors.items(), key=lambda kv: natural_key(kv[0])):
        module, kind = split_key(key)
        if kind is None:
            saved_params += t.numel()
            continue
        row = layers.setdefault(module, {"module": module, "params": 0})
        row["params"] += t.numel()
        if kind == "A":
            row["r"] = int(t.shape[0])
            row["a_shape"] = list(t.shape)
        else:
            row["b_shape"] = list(t.shape)
        row["dtype"] = str(t.dtype).removeprefix("torch.")
    for row in layers.values():
        row["alpha"] = cfg.alpha_for(row["module"])
        row["scale"] = cfg.scale_for(row["module"])
    info = {
        "folder": str(folder),
        "base_model": raw.get("base_model_name_or_path"),
        "peft_type": raw.get("peft_type"),
        "task_type": raw.get("task_type"),
        "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": raw.get("target_modules"),
        "modules_to_save": raw.get("modules_to_save"),
        "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern,
        "layers": list(layers.values()),
        "lora_parameters": sum(r["params"] for r in layers.values()),
        "saved_module_parameters": saved_params,
        "file_bytes": weights_file.stat().st_size,
        "config_bytes": config_file.stat().st_size,
    }
    info["trainable_parameters"] = info["lora_parameters"] + saved_params
    run_cfg = folder.parent / "train_config.yaml"
    if folder.name == "adapter" and run_cfg.is_file():
        info["training_config"] = str(run_cfg)
        metrics = folder.parent / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if rows:
                evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
                info["training"] = {"steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
                                    "final_eval_loss": evals[-1] if evals else None}
    return info


def natural_key(key: str) -> list:
    """Sort "layers.2" before "layers.10"."""
    import re
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def split_key(key: str) -> tuple[str, Any]:
    """PEFT key -> (module path, "A" / "B"), or (key, None) for modules_to_save parameters."""
    from ..io import PREFIX
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                         (".lora_embedding_B", "B")):
        if k.endswith(suffix):
            return k[:-len(suffix)], kind
    return k, None


def format_info(info: dict[str, Any], max_rows: int = 40) -> str:
    lines = [
        f"adapter folder:   {info['folder']}",
        f"base model:       {info['base_model']}",
        f"type:             {info['peft_type']} ({info['task_type']})",
        f"rank / alpha:     r={info['r']}, alpha={info['alpha']}" + (" (rsLoRA)" if info["use_rslora"] else "")
        + f", dropout={info['dropout']}",
        f"target modules:   {info['target_modules']}",
    ]
    if info["modules_to_save"]:
        lines.append(f"modules to save:  {info['modules_to_save']}")
    lines += [
        f"trainable params: {info['trainable_parameters']:,} ({len(info['layers'])} adapted layers)",
        f"file size:        {info['file_bytes']:,} bytes ({info['file_bytes'] / 1e6:.2f} MB) + config "
        f"{info['config_bytes']:,} bytes",
    ]
    if "training" in info:
        t = info["training"]
        ev = f", eval loss {t['final_eval_loss']:.4f}" if t["final_eval_loss"] is not None else ""
        lines.append(f"training:         {t['steps']} steps, final loss {t['final_loss']:.4f}{ev} "
                     f"(config: {info['training_config']})")
    rows = info["layers"]
    if rows:
        w = max(len(r["module"]) for r in rows)
        lines += ["", f"{'module':<{w}}  {'r':>3}  {'alpha':>6}  {'scale':>6}  {'A':>11}  {'B':>11}  {'params':>8}"]
        shown = rows if not max_rows or len(rows) <= max_rows else rows[:max_rows]
        for r in shown:
            a = "x".join(map(str, r.get("a_shape", []))) or "-"
            b = "x".join(map(str, r.get("b_shape", []))) or "-"
            lines.append(f"{r['module']:<{w}}  {r.get('r', '-'):>3}  {r['alpha']:>6g}  {r['scale']:>6.3g}  {a:>11}  "
                         f"{b:>11}  {r['params']:>8,}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more layers (--layers 0 shows all)")
    return "\n".join(lines)
