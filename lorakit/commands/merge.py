"""``lorakit merge``: fold an adapter into the base weights and write a full model folder.

    lorakit merge --adapter runs/sql/adapter --out merged/sql
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('merged/sql')"

W0 <- W0 + (alpha / r) B A for every adapted layer, then the LoRA layers are removed
(``lorakit.unload(model, merge=True)``) and the plain model is saved with
``save_pretrained`` (safetensors) next to its tokenizer. The command reports the largest
absolute difference between the logits of the unmerged model (adapter active) and of
the merged model, in memory and reloaded from the folder by plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraError

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Translate to German: good morning"]


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", required=True, help="the adapter folder to merge")
    parser.add_argument("--out", required=True, help="folder for the merged model (must not exist, or be empty)")
    parser.add_argument("--prompt", action="append", default=[], help="prompts for the logits check (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the base weights and of the merged model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-check", action="store_true", help="skip reloading the folder with transformers")


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    from ..models import load_base
    lm = load_base(args.model, args.dtype, args.device)
    report = merge_to_folder(lm, args.adapter, out, args.prompt or DEFAULT_PROMPTS, check=not args.no_check)
    print(f"merged {args.adapter} into {lm.name}: {report['layers']} layers; wrote {out} "
          f"({report['bytes'] / 1e6:.1f} MB)")
    reloaded = report.get("max_abs_diff_reloaded")
    print(f"max |logits difference| merged vs unmerged on {report['prompts']} prompts: "
          f"in memory {report['max_abs_diff']:.3g}"
          + (f", reloaded by transformers {reloaded:.3g}" if reloaded is not None else ""))
    return 0


def merge_to_folder(lm, adapter: str, out: Path, prompts: list[str], check: bool = True) -> dict:
    """Merge ``adapter`` into ``lm.model``, save it to ``out``; returns the logits report."""
    import torch

    import lorakit
    from ..inject import lora_layers
    from ..io import atomic_write_bytes
    model, tok = lm.model, lm.tokenizer
    lorakit.load_adapter(model, adapter, name="merge")
    layers = sum(1 for _ in lora_layers(model))
    batch = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
    with torch.no_grad():
        unmerged = model(**batch).logits.float()
        lorakit.unload(model, merge=True)            # W0 += s B A, LoRA layers removed
        merged = model(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    report = {"adapter": str(adapter), "base": lm.name, "layers": layers, "prompts": len(prompts),
              "max_abs_diff": float((merged - unmerged).abs()[mask].max())}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if check:
        report["max_abs_diff_reloaded"] = reload_diff(out, batch, unmerged, mask, lm.dtype, lm.device)
    report["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    atomic_write_bytes(out / "lorakit_merge.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def reload_diff(folder: Path, batch, reference, mask, dtype, device) -> float:
    """Load ``folder`` with plain transformers and compare its logits with ``reference``."""
    import torch
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = plain(**batch).logits.float()
    return float((logits - reference).abs()[mask].max())
