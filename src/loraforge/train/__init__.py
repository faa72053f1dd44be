"""Training: LoRA over PEFT in a readable loop built on accelerate."""

from loraforge.train.config import KNOWN_KEYS, TrainConfig, load_config
from loraforge.train.loop import Reporter, TrainResult, train

__all__ = ["KNOWN_KEYS", "Reporter", "TrainConfig", "TrainResult", "load_config", "train"]
