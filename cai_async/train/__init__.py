"""Training with TRL from recipes. torch, transformers, trl and peft are imported only when training runs."""

from cai_async.train.config import LoraSettings, RLAlgorithm, TrainConfig, TrainStage
from cai_async.train.run import run_training

__all__ = ["LoraSettings", "RLAlgorithm", "TrainConfig", "TrainStage", "run_training"]
