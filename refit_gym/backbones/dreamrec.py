"""DreamRec (Yang et al., NeurIPS 2023): generate the next item's embedding, guided by history.

The state is an embedding (d,) of the "oracle" next item; the condition c is a SASRec-style
encoding of the history (item and position embeddings, one causal self-attention block with layer
norms and a position-wise feed-forward layer, read at the last real position); a learned null
condition replaces c with probability ``cond_dropout`` in training, which makes classifier-free
guidance possible at inference: x0_hat = (1 + w) f(x_t, c, t) - w f(x_t, null, t). The loss is
the MSE of f's x0 prediction to the target's embedding E[target], which is trained jointly.
Inference starts from N(0, I) and samples the T-step (or a respaced K-step) chain; items are
ranked by x_0 E^T. Everything is batched: the last real position is a gather, not a loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from refit_gym.backbones.base import Batch
from refit_gym.backbones.next_item import NextItemBackbone, last_positions
from refit_gym.diffusion import DiffusionConfig, classifier_free_guidance


@dataclass(frozen=True)
class DreamRecConfig:
    n_items: int  # item ids 0..n_items-1; n_items itself pads histories
    max_len: int = 10  # L, the history length (the latest L items)
    hidden: int = 64  # d, the embedding size
    dropout: float = 0.1  # embedding, attention and feed-forward dropout (training only)
    cond_dropout: float = 0.1  # p of replacing c by the null condition in training
    guidance: float = 4.0  # w of classifier-free guidance at inference
    num_heads: int = 1
    # DreamRec learns E with its MSE loss, which can shrink E towards 0 (RESULTS.md, Zhihu); False
    # keeps E at its seeded N(0, I) draw, which no loss can collapse.
    train_item_table: bool = True


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """DreamRec's timestep embedding: (B,) -> (B, dim), [sin | cos] halves."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([args.sin(), args.cos()], dim=-1)


class HistoryEncoder(nn.Module):
    """SASRec-style: (B, L) right-padded item ids -> the output at the last real position (B, d).

    An all-padding history (an empty prefix) reads position 0, as DreamRec does.
    """

    def __init__(self, config: DreamRecConfig, item_embeddings: nn.Embedding) -> None:
        super().__init__()
        d = config.hidden
        self.config, self.item_embeddings = config, item_embeddings
        self.positions = nn.Embedding(config.max_len, d)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_in, self.norm_mid, self.norm_out = (nn.LayerNorm(d) for _ in range(3))
        self.query, self.key, self.value = (nn.Linear(d, d) for _ in range(3))
        self.ff_in, self.ff_out = nn.Linear(d, d), nn.Linear(d, d)
        self.ff_norm = nn.LayerNorm(d)

    def attention(self, queries: Tensor, keys: Tensor, real: Tensor) -> Tensor:
        """Causal multi-head attention over real (non-padding) keys, plus the residual."""
        heads, (b, length, d) = self.config.num_heads, queries.shape

        def split(x: Tensor) -> Tensor:
            return x.view(b, length, heads, d // heads).transpose(1, 2)

        q, k, v = split(self.query(queries)), split(self.key(keys)), split(self.value(keys))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # DreamRec scales by sqrt(d), not d/h
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        allowed = causal & real[:, None, None, :]
        # A finite fill (as DreamRec's -2^32 + 1) keeps an all-padding row finite.
        weights = logits.masked_fill(~allowed, -(2.0**32) + 1).softmax(-1)
        out = (self.dropout(weights) @ v).transpose(1, 2).reshape(b, length, d)
        return out + queries

    def sequence(self, history: Tensor) -> Tensor:
        """(B, L) right-padded ids -> (B, L, d): the output at every position, each seeing
        that position and the earlier ones only (so position i of a history is the output
        its first i + 1 items would give alone)."""
        real = history != self.config.n_items
        seq = self.item_embeddings(history) + self.positions.weight[: history.shape[1]]
        seq = self.dropout(seq) * real.unsqueeze(-1)
        attended = self.attention(self.norm_in(seq), seq, real)
        x = self.norm_mid(attended)
        ff = self.ff_norm(self.dropout(self.ff_out(torch.relu(self.ff_in(x)))) + x)
        return self.norm_out(ff * real.unsqueeze(-1))

    def forward(self, history: Tensor) -> Tensor:
        out = self.sequence(history)
        last = last_positions(history, self.config.n_items)
        return out[torch.arange(len(history), device=history.device), last]


class DreamRec(NextItemBackbone):
    """Guided diffusion over next-item embeddings; batches ``{"history", "target"}``."""

    name: ClassVar[str] = "dreamrec"
    stochastic_inference: ClassVar[bool] = True

    def __init__(self, config: DreamRecConfig, diffusion_config: DiffusionConfig) -> None:
        super().__init__(config, diffusion_config)
        d = config.hidden
        if d % config.num_heads:
            raise ValueError(f"hidden ({d}) must be a multiple of num_heads ({config.num_heads})")
        self.item_embeddings = nn.Embedding(config.n_items + 1, d)  # row n_items: padding
        nn.init.normal_(self.item_embeddings.weight, 0.0, 1.0)
        self.item_embeddings.weight.requires_grad_(config.train_item_table)
        self.null_condition = nn.Parameter(torch.randn(d))
        self.encoder = HistoryEncoder(config, self.item_embeddings)
        self.step_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.denoiser = nn.Linear(3 * d, d)  # DreamRec's "mlp1" diffuser on [x_t, c, emb(t)]

    @property
    def condition_dim(self) -> int:
        return self.config.hidden

    def denoise(self, x_t: Tensor, condition: Tensor, t: Tensor) -> Tensor:
        """f_theta(x_t, c, t) (B, d), unguided."""
        step = self.step_mlp(sinusoidal_embedding(t, self.config.hidden))
        return self.denoiser(torch.cat([x_t, condition, step], dim=-1))

    def encode(self, batch: Batch) -> Tensor:
        return self.encoder(batch["history"])

    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        w = self.config.guidance
        if w == 0:
            return self.denoise(x_t, condition, t)
        null = self.null_condition.expand_as(condition)
        both = self.denoise(torch.cat([x_t, x_t]), torch.cat([condition, null]), torch.cat([t, t]))
        x0_cond, x0_null = both.chunk(2)
        return classifier_free_guidance(x0_cond, x0_null, w)

    def training_loss(self, batch: Batch, t: Tensor, generator: torch.Generator) -> Tensor:
        """MSE (B,) of f(x_t, c or null, t) to E[target]; E is trained by it too."""
        x0 = self.item_embeddings(batch["target"])
        condition = self.encode(batch)
        rows, device = len(x0), x0.device
        dropped = torch.rand(rows, generator=generator).to(device) < self.config.cond_dropout
        condition = torch.where(dropped.unsqueeze(-1), self.null_condition.expand_as(condition),
                                condition)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        predicted = self.denoise(self.diffusion.q_sample(x0, t, noise), condition, t)
        return (predicted - x0).pow(2).mean(-1)

