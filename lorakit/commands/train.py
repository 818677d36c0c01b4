"""``lorakit train``: fine-tune a LoRA adapter on a causal LM from JSONL data.

    lorakit train --train-file data.jsonl --steps 200 --out-dir runs/sql
    lorakit train --config train.yaml --lr 1e-3            # flags override the file
    lorakit train --config train.yaml --resume             # continue from the latest checkpoint

Every field of the training config is a flag (``lorakit train --help`` lists them by
section); the resolved config is saved as ``<out-dir>/train_config.yaml``.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    from ..train.config import add_flags
    parser.add_argument("--config", metavar="YAML", help="a YAML file with sections model, lora, data, optim, run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_flags(parser)


def run(args) -> int:
    from ..train.config import TrainConfig, flag_overrides
    cfg = TrainConfig.load(args.config, flag_overrides(args))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from ..models import load_base
    from ..train.loop import train
    loaded = load_base(cfg.model.model, cfg.model.dtype, cfg.model.device)
    print(f"base model: {loaded.name} ({loaded.kind}, {loaded.dtype}, {loaded.device})")
    result = train(cfg, loaded)
    d = result.data
    print(f"data: {d['examples']} training examples ({d['format']}, {d['trained_tokens']:,} trained tokens; "
          f"{d['truncated']} truncated, {d['dropped']} dropped); validation: {d['valid']}")
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    eval_part = f", eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else ""
    loss_part = f"final loss {result.final_loss:.4f}" if result.final_loss is not None else "no step run"
    print(f"{result.steps} steps{resumed} in {result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s; "
          f"{loss_part}{eval_part}")
    print(f"adapter: {result.adapter_dir}")
    print(f"metrics: {result.out_dir / 'metrics.jsonl'}, curve: {result.out_dir / 'loss.png'}")
    return 0
