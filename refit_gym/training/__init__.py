"""The training layer: each scenario's metrics and evaluation protocol, pretraining with the
backbone's own loss, the fine-tuning driver shared by every algorithm (and
``evaluate_tuned_chain``: a model's metrics on the chain the agents tune), what their
resumable runs save (``resume``), and the benchmark."""

from refit_gym.training.bench import run_bench
from refit_gym.training.finetune import ALGOS, evaluate_tuned_chain, finetune
from refit_gym.training.metrics import (
    evaluate,
    evaluate_cf,
    evaluate_sequential,
    format_metrics_table,
    next_item_metrics,
    ranking_metrics,
)
from refit_gym.training.pretrain import (
    LossAwareTimestepSampler,
    UniformTimestepSampler,
    make_timestep_sampler,
    pretrain,
    train_epoch,
)

__all__ = ["ALGOS", "LossAwareTimestepSampler", "UniformTimestepSampler", "evaluate",
           "evaluate_cf", "evaluate_sequential", "evaluate_tuned_chain", "finetune",
           "format_metrics_table", "make_timestep_sampler", "next_item_metrics", "pretrain",
           "ranking_metrics", "run_bench", "train_epoch"]
