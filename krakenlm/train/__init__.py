"""Training: the trainer (trainer.py) and its verbs (cli.py); prepared data lives in krakenlm.data."""

from krakenlm.data import prepare
from krakenlm.eval.perplexity import mean_cross_entropy, perplexity
from krakenlm.train.trainer import TrainConfig, TrainResult, get_recipe, lr_at, make_optimizer, param_groups, train

__all__ = ["TrainConfig", "TrainResult", "get_recipe", "lr_at", "make_optimizer", "mean_cross_entropy", "param_groups",
           "perplexity", "prepare", "train"]
