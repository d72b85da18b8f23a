"""The backbone interface: what the MDP core, the agents, pretraining, ``continue`` and
evaluation need of a diffusion recommender, whatever its scenario.

A *batch* is a dict of tensors built by the dataset (``data.train_batch``/``data.eval_batch``):
collaborative filtering ``{"history": (B, n_items) float32}``; sequential ``{"history": (B, L)
long item ids, "target": (B,) long}``. A backbone owns its networks and its T-step training
schedule (``self.diffusion``); a respaced K-step *chain* (:meth:`GaussianDiffusion.respaced`) can
be passed wherever the reverse process runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from refit_gym.backbones.row_noise import RowNoise
from refit_gym.diffusion import DiffusionConfig, GaussianDiffusion

Batch = dict[str, Tensor]


class Backbone(nn.Module, ABC):
    """A pretrained diffusion recommender over states of ``state_dim`` numbers."""

    name: ClassVar[str]  # the key of BACKBONES and of checkpoints
    stochastic_inference: ClassVar[bool]  # False: the mean chain (DiffRec); True: sampled
    sequential: ClassVar[bool] = False  # True: rows are histories and the state an item embedding

    def __init__(self, config: Any, diffusion_config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.diffusion = GaussianDiffusion(diffusion_config)

    def _apply(self, fn: Any, recurse: bool = True) -> Backbone:
        module = super()._apply(fn, recurse)
        device = next(self.parameters()).device
        if device != self.diffusion.device:  # the schedule follows .to(device)
            self.diffusion = self.diffusion.to(device)
        return module

    @property
    @abstractmethod
    def state_dim(self) -> int:
        """Dimension d of a diffusion state x_t (DiffRec: n_items; DreamRec: embedding size)."""

    @property
    @abstractmethod
    def n_items(self) -> int:
        """Number of rankable items (columns of :meth:`scores`)."""

    @property
    def condition_dim(self) -> int:
        """Width of :meth:`encode`'s output; 0 for an unconditional backbone."""
        return 0

    @property
    def value_feature_dim(self) -> int:
        """Width of :meth:`value_features`' output."""
        return self.condition_dim

    def value_features(self, condition: Tensor | None) -> Tensor | None:
        """What a critic (the SB3 agents' value head) reads of a condition c: all of it, unless
        c holds more than a summary of the row (ADRec's carries its decoder's cache)."""
        return condition

    def item_table(self) -> Tensor | None:
        """E (n_items, d) when final states are scored against item embeddings, else None."""
        return None

    def freeze_for_finetuning(self) -> Backbone:
        """Turn off gradients of what fine-tuning must keep (the environment's reward is defined
        through it, e.g. DreamRec's E); returns self."""
        return self

    def training_rows(self, data: Any) -> Any:
        """The training rows (an index array) an epoch of the backbone's own loss passes over;
        None: every row of ``data``."""
        return None

    def begin_pretrain_epoch(self, epoch: int) -> None:
        """Called before each pretraining epoch (1-based), e.g. to change a staged schedule's
        trained parameters or loss; a backbone trained in one stage does nothing."""

    @property
    def selection_start(self) -> int:
        """The first pretraining epoch whose model selection by validation may keep (earlier
        stages are neither evaluated nor counted by the patience)."""
        return 1

    @abstractmethod
    def encode(self, batch: Batch) -> Tensor | None:
        """The per-row condition c (B, ...) of the reverse process, computed once per episode;
        None for an unconditional backbone."""

    @abstractmethod
    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        """f_theta(x_t, c, t) -> x_0 (B, d), guidance included; ``t`` (B,) network timesteps."""

    @abstractmethod
    def initial_state(self, batch: Batch, chain: GaussianDiffusion,
                      generator: torch.Generator | None) -> Tensor:
        """x_K (B, d), where the reverse chain starts."""

    @abstractmethod
    def training_loss(self, batch: Batch, t: Tensor, generator: torch.Generator) -> Tensor:
        """The backbone's own per-row loss (B,) at network timesteps ``t`` (B,); its draws
        (noise, condition dropout) come from ``generator``."""

    @abstractmethod
    def scores(self, x0: Tensor) -> Tensor:
        """Item scores (B, n_items) of final states x_0 (B, d); higher ranks first."""

    def reverse_mean(self, x_t: Tensor, t: Tensor, condition: Tensor | None,
                     chain: GaussianDiffusion | None = None) -> Tensor:
        """mu_theta(x_t, c, t) (B, d): the posterior mean at the (guided) x0 prediction, for
        chain steps ``t`` (B,) of ``chain`` (default: the training schedule)."""
        chain = chain or self.diffusion
        return chain.posterior_mean(self.predict_x0(x_t, chain.network_t(t), condition), x_t, t)

    def reverse_std(self, t: Tensor, chain: GaussianDiffusion | None = None) -> Tensor:
        """sigma_t (B,) float64, the fixed std of the reverse step at chain steps ``t``."""
        return (chain or self.diffusion).reverse_std(t)

    def rank_scores(self, batch: Batch, chain: GaussianDiffusion | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Item scores (B, n_items) of the backbone's own inference on ``batch``."""
        return self.scores(self.generate(batch, chain, generator))

    @torch.no_grad()
    def generate(self, batch: Batch, chain: GaussianDiffusion | None = None,
                 generator: torch.Generator | None = None, start: Tensor | None = None) -> Tensor:
        """The backbone's own inference chain from x_K to x_0 (B, d): the mean at every step, or,
        when ``stochastic_inference``, the mean plus sigma_t z at every step but the last.
        ``start``: x_K when given (an environment's), else :meth:`initial_state`.

        Draws keyed by row: when ``batch`` holds ``"row"`` (B,) long, the rows' indices in their
        split, and ``generator`` is given, x_K and z of each row come from its row block's
        generator under the seed ``generator.initial_seed()`` (:class:`RowNoise`), not from
        ``generator``'s stream: a row draws the same whatever batch it is evaluated in."""
        chain = chain or self.diffusion
        condition = self.encode(batch)
        keyed = None
        if generator is not None and "row" in batch:
            keyed = RowNoise(generator.initial_seed(), batch["row"], generator.device)
        if start is not None:
            x = start
        elif keyed is not None:
            x = keyed.initial_state(batch, lambda rows, g: self.initial_state(rows, chain, g))
        else:
            x = self.initial_state(batch, chain, generator)
        for step in reversed(range(chain.steps)):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x_next = self.reverse_mean(x, t, condition, chain)
            if self.stochastic_inference and step > 0:
                noise = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                         if keyed is None else keyed.randn(x.shape[1], x.dtype).to(x.device))
                x_next = x_next + chain.reverse_std(t).to(x.dtype).unsqueeze(-1) * noise
            x = x_next
        return x
