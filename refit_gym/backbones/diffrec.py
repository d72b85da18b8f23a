"""DiffRec (Wang et al., SIGIR 2023): Gaussian diffusion over a user's interaction vector.

The state is the user's interaction vector (n_items,); there is no condition (the chain starts
from the history itself); the MLP denoiser f_theta(x_t, t) predicts x_0 (DiffRec's ``DNN`` with
time_type='cat'); the loss is the x0-MSE weighted by SNR(t-1) - SNR(t); inference runs the T
reverse steps along the mean and ranks by x_0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
from torch import Tensor, nn

from refit_gym.backbones.base import Backbone, Batch
from refit_gym.diffusion import DiffusionConfig, GaussianDiffusion


@dataclass(frozen=True)
class DiffRecConfig:
    n_items: int
    dims: tuple[int, ...] = (200, 600)  # DiffRec's --dims: decoder widths; encoder mirrors them
    time_emb: int = 10
    dropout: float = 0.5  # on the input, during training only
    norm: bool = False  # L2-normalise the input row (DiffRec's --norm)
    reweight: bool = True  # weight the x0-MSE of step t by SNR(t-1) - SNR(t)
    sampling_steps: int = 0  # inference starts from q(x_k | h) with k = this (0: h itself)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps: (B,) -> (B, dim), [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class DiffRec(Backbone):
    """(x_t, t) -> x_0 prediction. x_t (B, n_items) float32, t (B,) long in [0, T).

    ML-1M, dims (200, 600): [x_t | emb(t)] (n+10) -> 600 -> 200 -> 600 -> n, tanh between
    layers, linear output.
    """

    name: ClassVar[str] = "diffrec"
    stochastic_inference: ClassVar[bool] = False

    def __init__(self, config: DiffRecConfig, diffusion_config: DiffusionConfig) -> None:
        super().__init__(config, diffusion_config)
        if not 0 <= config.sampling_steps <= diffusion_config.steps:
            raise ValueError(f"sampling_steps must be in [0, {diffusion_config.steps}], got "
                             f"{config.sampling_steps}")
        widths_out = [*config.dims, config.n_items]
        widths_in = [config.n_items + config.time_emb, *reversed(config.dims)]
        self.time_layer = nn.Linear(config.time_emb, config.time_emb)
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths_in))
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths_out))
        self.input_dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiffRec's init: weights N(0, 2 / (fan_in + fan_out)), biases N(0, 1e-3^2)."""
        for layer in [self.time_layer, *self.encoder, *self.decoder]:
            fan_out, fan_in = layer.weight.shape
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
            nn.init.normal_(layer.bias, 0.0, 0.001)

    @property
    def state_dim(self) -> int:
        return self.config.n_items

    @property
    def n_items(self) -> int:
        return self.config.n_items

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.config.norm:
            x_t = nn.functional.normalize(x_t, dim=-1)
        h = torch.cat(
            [self.input_dropout(x_t), self.time_layer(timestep_embedding(t, self.config.time_emb))],
            dim=-1,
        )
        for layer in self.encoder:
            h = torch.tanh(layer(h))
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < len(self.decoder) - 1:
                h = torch.tanh(h)
        return h

    def encode(self, batch: Batch) -> None:
        return None

    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        return self(x_t, t)

    def initial_state(self, batch: Batch, chain: GaussianDiffusion,
                      generator: torch.Generator | None) -> Tensor:
        """The history h_u, or a draw of q(x_k | h_u) with k = ``sampling_steps``."""
        x = batch["history"]
        k = self.config.sampling_steps
        if k > 0:
            t = torch.full((x.shape[0],), k - 1, device=x.device, dtype=torch.long)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.diffusion.q_sample(x, t, noise)
        return x

    def training_loss(self, batch: Batch, t: Tensor, generator: torch.Generator) -> Tensor:
        """x0-MSE of each row (B,), weighted by SNR(t-1) - SNR(t) when ``reweight``."""
        x0 = batch["history"]
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        mse = (self(self.diffusion.q_sample(x0, t, noise), t) - x0).pow(2).mean(dim=1)
        if not self.config.reweight:
            return mse
        return self.diffusion.snr_weight(t).to(mse.dtype) * mse

    def scores(self, x0: Tensor) -> Tensor:
        return x0
