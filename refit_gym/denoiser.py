"""DiffRec's MLP denoiser f_theta(x_t, t) -> predicted x_0 (its ``DNN`` with time_type='cat')."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DenoiserConfig:
    n_items: int
    dims: tuple[int, ...] = (200, 600)  # DiffRec's --dims: decoder widths; encoder mirrors them
    time_emb: int = 10
    dropout: float = 0.5  # on the input, during training only
    norm: bool = False  # L2-normalise the input row (DiffRec's --norm)


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


class MLPDenoiser(nn.Module):
    """(x_t, t) -> x_0 prediction. x_t (B, n_items) float32, t (B,) long in [0, T).

    ML-1M, dims (200, 600): [x_t | emb(t)] (n+10) -> 600 -> 200 -> 600 -> n, tanh between
    layers, linear output.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
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
