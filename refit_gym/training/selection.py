"""One rule for selecting a model by validation, for every loop that selects one (the epochs
of pretraining and of SASRec, fine-tuning's evaluations, a peer's grid).

The rule: a candidate is better only when its ``split`` (default validation) ``metric`` is
strictly higher than the best so far (the earliest of equal scores is kept; NaN never wins).
Patience counts epochs, not evaluations, so evaluating every second epoch does not double it.
The one definition: patience P is the number of epochs that run after the best epoch without a
better score; epoch best + P + 1 is not run (while nothing was selected, count from
``start - 1`` instead of the best). This is Keras' ``EarlyStopping(patience=P)`` and SASRec's
``patience``. A pretraining spec's ``patience`` follows DiffRec's main.py instead (the run stops
at epoch best + P without running it), so it is the Selector's patience + 1; the conversion is
:func:`refit_gym.training.pretrain.pretrain_selector` and pretraining's report records both.

Usage (``weights`` is a state dict, copied to the CPU when kept)::

    selector = Selector("ndcg@20", patience=3, start=1)
    for epoch in range(1, max_epochs + 1):
        if selector.should_stop(epoch):
            break
        train_one_epoch()
        selector.offer(epoch, evaluate(model, data, config), model.state_dict())
    model.load_state_dict(selector.best_weights)
    report = selector.summary()  # metric, patience, best epoch and score, curve, digest

A resumable run saves ``selector.state_dict()`` in its state file and restores it with
``Selector.from_state(state)``; both are plain dicts, lists, floats and tensors (loadable with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def weights_digest(weights: Mapping[str, Tensor]) -> str:
    """sha256 (hex) of a state dict: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Selector:
    """The best candidate by ``split``/``metric``, the validation curve, and when to stop.

    ``patience``: the epochs that run after the best one without a better score (the module's
    definition: :meth:`should_stop` refuses epoch best + patience + 1; None: never stop, e.g. a
    grid). ``start``: the first epoch that can be selected (epochs before it do not use up
    patience). ``keep_weights``: keep a CPU copy of the best weights (False: only
    their digest, for a loop that writes its best checkpoint itself).
    """

    def __init__(self, metric: str, *, patience: int | None = None, start: int = 0,
                 split: str = "valid", keep_weights: bool = True) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 epochs (or None: never stop), "
                             f"got {patience}")
        self.metric, self.patience, self.start, self.split = metric, patience, start, split
        self.keep_weights = keep_weights
        self.curve: list[dict[str, float]] = []  # {"epoch", "score"} per offer, in order
        self.best_epoch: int | None = None
        self.best_score = -math.inf
        self.best_metrics: dict[str, Any] = {}
        self.best_weights: dict[str, Tensor] | None = None
        self.digest: str | None = None

    def offer(self, epoch: int, metrics: Mapping[str, Any],
              weights: Mapping[str, Tensor] | None = None) -> bool:
        """Record ``metrics[split][metric]`` of epoch ``epoch`` (or any increasing candidate
        number, e.g. a grid point's index); keep it, with ``weights``, if it is strictly
        better than the best so far. Returns whether it was kept."""
        score = float(metrics[self.split][self.metric])
        self.curve.append({"epoch": epoch, "score": score})
        if not score > self.best_score:  # NaN and ties lose: the earliest best stays
            return False
        self.best_epoch, self.best_score, self.best_metrics = epoch, score, dict(metrics)
        if weights is not None:
            self.digest = weights_digest(weights)
            if self.keep_weights:
                self.best_weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
        return True

    def should_stop(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` should not run: the ``patience`` epochs after the best one
        (after ``start - 1`` before any was selected) have all run."""
        if self.patience is None:
            return False
        since = self.start - 1 if self.best_epoch is None else max(self.best_epoch,
                                                                   self.start - 1)
        return epoch - since > self.patience

    def summary(self) -> dict[str, Any]:
        """What a report records of the selection (JSON-able); ``patience_epochs`` is the
        Selector's patience, as defined in the module docstring."""
        return {"metric": f"{self.split} {self.metric}", "patience_epochs": self.patience,
                "best_epoch": self.best_epoch, "best_score": self.best_score,
                "weights_sha256": self.digest, "curve": list(self.curve)}

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume the selection (the kept weights included)."""
        return {"metric": self.metric, "patience": self.patience, "start": self.start,
                "split": self.split, "keep_weights": self.keep_weights, "curve": self.curve,
                "best_epoch": self.best_epoch, "best_score": self.best_score,
                "best_metrics": self.best_metrics, "best_weights": self.best_weights,
                "digest": self.digest}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Selector:
        """The selector :meth:`state_dict` saved."""
        selector = cls(state["metric"], patience=state["patience"], start=state["start"],
                       split=state["split"], keep_weights=state["keep_weights"])
        for key in ("curve", "best_epoch", "best_score", "best_metrics", "best_weights",
                    "digest"):
            setattr(selector, key, state[key])
        return selector
