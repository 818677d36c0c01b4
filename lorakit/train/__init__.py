"""Fine-tuning LoRA adapters on causal language models.

* ``config``: the typed training configuration (YAML and flags);
* ``data``: JSONL formats -> token ids with loss masks -> batches;
* ``loop``: ``train(cfg)``, readable top to bottom;
* ``checkpoint``: atomic checkpoints and exact resume;
* ``outputs``: metrics, loss curve, README, the Dist helper.

Nothing heavy is imported here: ``from lorakit.train import TrainConfig, train`` loads
transformers only when a model is loaded.
"""

from .config import TrainConfig
from .loop import TrainResult, TrainingError, train

__all__ = ["TrainConfig", "train", "TrainResult", "TrainingError"]
