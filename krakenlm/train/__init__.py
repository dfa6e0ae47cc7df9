"""Training: data preparation (data.py), the trainer (trainer.py) and perplexity (perplexity.py)."""

from krakenlm.train.data import prepare
from krakenlm.train.perplexity import mean_cross_entropy, perplexity
from krakenlm.train.trainer import TrainConfig, TrainResult, get_recipe, lr_at, make_optimizer, param_groups, train

__all__ = ["TrainConfig", "TrainResult", "get_recipe", "lr_at", "make_optimizer", "mean_cross_entropy", "param_groups",
           "perplexity", "prepare", "train"]
