"""Training: LoRA over PEFT in a readable recipe built on accelerate (:mod:`loraforge.train.recipe`)."""

from loraforge.train.config import KNOWN_KEYS, TrainConfig, load_config
from loraforge.train.recipe import Reporter, TrainResult, train

__all__ = ["KNOWN_KEYS", "Reporter", "TrainConfig", "TrainResult", "load_config", "train"]
