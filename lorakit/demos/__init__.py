"""Runnable demos behind ``lorakit demo <name>`` (dispatched by lorakit/commands/demo.py).

Each demo module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and imports its
heavy dependencies inside ``run``:

* ``digits``: the classic LoRA experiment (an oversized MLP on handwritten digits, fine-tuned
  with a rank-1 adapter on the digit it gets most wrong), in under a minute on a laptop CPU;
* ``tasks``: the main job (fine-tune the embedded default LLM on two tasks, switch adapters).
"""
