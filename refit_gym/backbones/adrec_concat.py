"""ADRec-Concat: this project's own variant of ADRec, built so that its denoising chain decides.

ADRec's decoder reads the noisy state as r + 0.001 (x_t + emb(t)), so its final state is almost
a function of the history and a policy gradient on its chain has nothing to act on
(benchmarks/results/chain_influence.md: 5e-9 of the reward's variance is the chain's). This
variant keeps everything of ADRec's but the decoder: its causal history encoder, its item table,
its loss (cross-entropy of x0_hat E^T + MSE to E[target], every target position diffused with its
own t), its three training stages and its 32-step sampler. The decoder is DreamRec's
concatenating denoiser (its "mlp2": Linear(3d, 2d), GELU, Linear(2d, d)) applied per position to
[x_t ; r ; emb(t)], which reads x_t at full scale: at small t the state itself says which item is
coming, so where the chain went decides the outcome.

Neither ADRec nor DreamRec publishes this model; it is named as the project's own in its specs,
the README and RESULTS.md, beside the faithful ADRec. Its item
table must start larger than ADRec's (``embedding_std``) for the chain to decide: x_t tells the
denoiser which item is coming only once the embeddings stand out of the noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from refit_gym.backbones.adrec import ADRec, ADRecConfig
from refit_gym.backbones.base import Batch
from refit_gym.diffusion import DiffusionConfig


@dataclass(frozen=True)
class ConcatADRecConfig(ADRecConfig):
    """ADRec's fields, less its Transformer decoder: ``decoder_blocks`` must be 0 and
    ``state_scale`` 1 (x_t enters the concatenating denoiser as it is)."""

    decoder_blocks: int = 0
    state_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.decoder_blocks != 0 or self.state_scale != 1.0:
            raise ValueError(
                "adrec_concat has no Transformer decoder and reads x_t at full scale: leave "
                f"decoder_blocks (got {self.decoder_blocks}) and state_scale (got "
                f"{self.state_scale}) out of its spec; they are ADRec's (type = \"adrec\")")


class ConcatADRec(ADRec):
    """ADRec's encoder, losses and stages with DreamRec's concatenating denoiser; batches
    ``{"history", "target"}``. The condition is r at the last history position (B, d)."""

    name: ClassVar[str] = "adrec_concat"

    def __init__(self, config: ConcatADRecConfig, diffusion_config: DiffusionConfig) -> None:
        super().__init__(config, diffusion_config)
        d = config.hidden
        self.denoiser = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    @property
    def condition_dim(self) -> int:
        return self.config.hidden

    def value_features(self, condition: Tensor | None) -> Tensor | None:
        return condition

    def decode_sequence(self, rep: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0_hat (..., d) from r, x_t (..., d) and network timesteps t (...): position-wise."""
        return self.denoiser(torch.cat([x_t, rep, self._time(t)], dim=-1))

    def encode(self, batch: Batch) -> Tensor:
        """r at each row's last history position (B, d)."""
        return self._by_length_group(
            batch["history"],
            lambda history, last: self.encode_sequence(history)[
                torch.arange(len(history), device=history.device), last])

    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        """x0_hat (B, d) of the next item at state x_t (B, d), network timesteps t (B,)."""
        return self.decode_sequence(condition, x_t, t)

