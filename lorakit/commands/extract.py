"""``lorakit extract --base A --tuned B --rank R --out DIR``: a LoRA adapter from a full fine-tune.

Each changed weight's update dW = W_tuned - W_base is replaced by its best rank-R
approximation, written as B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T with lora_alpha = R
(scale 1), in PEFT's layout: `lorakit.load_adapter` and `PeftModel.from_pretrained` read it.
The per-layer relative errors are printed and saved in DIR/extraction_report.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--base", required=True, help="base checkpoint: .safetensors file, folder of them, "
                        "or Hugging Face model folder")
    parser.add_argument("--tuned", required=True, help="fully fine-tuned checkpoint of the same architecture")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank R of the extracted adapter")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--include", default=None, metavar="REGEX", help="only layers whose path matches (re.search)")
    parser.add_argument("--exclude", default=None, metavar="REGEX", help="skip layers whose path matches")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of the saved A and B (default auto: the base weight's dtype)")
    parser.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, ...; default cpu)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report here")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")


def run(args) -> int:
    import torch
    from .. import analysis
    from .analyze import format_table
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    result = analysis.extract_lora(args.base, args.tuned, args.rank, args.out, args.include, args.exclude,
                                   dtype=dtype, device=args.device,
                                   progress=not args.quiet and sys.stderr.isatty())
    if not args.quiet:
        head = ("layer", "kind", "shape", "rank", "rel. error of dW", "rel. error of W")
        rows = [(x.name, x.kind, "x".join(map(str, x.shape)), x.rank, f"{x.relative_error:.3g}",
                 f"{x.relative_weight_error:.3g}") for x in result.layers]
        print(format_table(head, rows))
        worst = max(result.layers, key=lambda x: x.relative_error)
        print(f"Extracted a rank-{args.rank} adapter (lora_alpha={args.rank}, scale 1) for {len(result.layers)} "
              f"layers into {result.folder}; largest relative error {worst.relative_error:.3g} ({worst.name})")
        if result.unchanged:
            print(f"{len(result.unchanged)} selected layers did not change and are not adapted")
        if result.not_captured:
            print(f"warning: {len(result.not_captured)} changed tensors cannot be carried by a LoRA adapter and "
                  "are lost (biases, norms, ...): " + ", ".join(result.not_captured[:8])
                  + (" ..." if len(result.not_captured) > 8 else ""))
    if args.json:
        from ..io import atomic_write_bytes
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    return 0
