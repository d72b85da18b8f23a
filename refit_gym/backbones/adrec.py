"""ADRec (KDD 2025, Nemo-1024/ADRec): token-level diffusion over a causal Transformer.

A causal Transformer *encoder* reads the history's item embeddings (no positional embeddings:
order comes from the causal mask) into a representation r_j per position. A causal Transformer
*decoder* predicts x_0 at every position from r_j + lambda (x_t,j + emb(t_j)): in training every
position j diffuses its own target E[s_{j+1}] with its own t_j; the loss is (cross-entropy of
x0_hat E^T against the target, averaged over the batch's target tokens + MSE of x0_hat to
E[target], averaged over each row's tokens, then rows) / 2.
At inference only the last position is noisy: the earlier ones hold their known clean targets at
t = 0, and the reverse chain (DDPM's fixed-large variance, 32 steps) runs on the last token, whose
final state is scored by inner product with E. Training runs in three stages, by epoch:
cross-entropy on r_j E^T (item-embedding pretraining), the diffusion loss with E frozen
(warm-up), then everything.

Read to reproduce, not copied. Where this differs from ADRec's code: stage 1 trains this model's
own history encoder, which then stays, for a fixed number of epochs (ADRec trains a separate
SASRec, N(0, 0.1) init, LayerNorm before dropout, to early stopping, and keeps only its item
table); E stays exactly frozen in the warm-up (ADRec's weight decay shrinks it through a zero
gradient); histories are right-padded and padding is never attended or scored (ADRec's left
padding is attended by real tokens and is a class of its softmax); the fused q/k/v projection
gets one Xavier init over (3d, d), a smaller std than ADRec's three (d, d) ones; AdamW with a
constant learning rate (ADRec: Adam with L2 1e-5, cosine over 500 epochs); selection by one
validation metric with the project's patience rule (ADRec: any of six metrics improving, four
evaluations); metrics averaged over rows (ADRec: over batches of 512).

``state_scale`` is lambda: ADRec's 0.001 leaves the chain almost no say over the outcome (see
:mod:`refit_gym.training.chain_influence`), and so does a larger one, since ADRec's item
embeddings stay small against the noise; the project's own variant whose chain decides is
:mod:`refit_gym.backbones.adrec_concat`.

Inference runs the decoder on the last token only, attending to keys and values of the earlier
positions cached once per row by :meth:`ADRec.encode`: exact (the decoder is causal), and about
L times cheaper per step than a full pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refit_gym.backbones.base import Batch
from refit_gym.backbones.next_item import (
    NextItemBackbone,
    every_position_targets,
    last_positions,
)
from refit_gym.data import Dataset, SequenceData
from refit_gym.diffusion import DiffusionConfig

STAGES = ("embeddings", "warmup", "full")
# Rows are run through the Transformers in groups of similar length, each trimmed to the width
# its longest row needs: exact (right padding under a causal mask is never attended), and most
# histories are short (Beauty: median 4 of 50 positions), so most of the padding's cost goes.
GROUP_WIDTHS = (8, 16, 32)


@dataclass(frozen=True)
class ADRecConfig:
    n_items: int  # item ids 0..n_items-1; n_items itself pads histories
    max_len: int = 50
    hidden: int = 128
    num_heads: int = 4
    ff_hidden: int = 512
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    dropout: float = 0.1  # attention, feed-forward and residual dropout
    embedding_dropout: float = 0.3  # on the history's item embeddings
    state_scale: float = 0.001  # lambda of r + lambda (x_t + emb(t)); ADRec's fixed 0.001
    embedding_std: float = 0.1  # N(0, std) initial item table (ADRec's SASRec init)
    embedding_epochs: int = 20  # stage 1: cross-entropy on the encoder's output only
    warmup_epochs: int = 5  # stage 2: the diffusion loss with the item table frozen

    def stage(self, epoch: int) -> str:
        """The training stage of pretraining epoch ``epoch`` (1-based)."""
        if epoch <= self.embedding_epochs:
            return "embeddings"
        return "warmup" if epoch <= self.embedding_epochs + self.warmup_epochs else "full"


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """ADRec's (DiffuRec's) sinusoidal embedding of float timesteps: (...,) -> (..., dim),
    [cos | sin] halves, max period 10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class CausalBlock(nn.Module):
    """A post-LN Transformer block with causal self-attention: LN(x + drop(attn(x))), then
    LN(x + drop(ffn(x))), ffn = W2 drop(gelu_tanh(W1 x))."""

    def __init__(self, config: ADRecConfig) -> None:
        super().__init__()
        d = config.hidden
        self.heads, self.p = config.num_heads, config.dropout
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff_in, self.ff_out = nn.Linear(d, config.ff_hidden), nn.Linear(config.ff_hidden, d)
        self.norm_attn, self.norm_ff = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        for layer in (self.qkv, self.out, self.ff_in, self.ff_out):
            nn.init.xavier_normal_(layer.weight)
        self.drop = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, d) -> (B, heads, L, d / heads)."""
        b, length, d = x.shape
        return x.view(b, length, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, -1)

    def _finish(self, x: Tensor, attended: Tensor) -> Tensor:
        x = self.norm_attn(x + self.drop(self.out(attended)))
        ff = self.ff_out(self.drop(F.gelu(self.ff_in(x), approximate="tanh")))
        return self.norm_ff(x + self.drop(ff))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, d) -> (output (B, L, d), keys, values (B, heads, L, d / heads)).

        Right padding needs no key mask under a causal one: a real token never sees a later
        (padding) position."""
        q, k, v = (self._heads(part) for part in self.qkv(x).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        return self._finish(x, self._merge(attended)), k, v

    def last_token(self, x: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
        """One token x (B, d) after the cached positions: keys, values (B, heads, L, d / heads)
        of which ``visible`` (B, L) bool are earlier than it -> its output (B, d).

        The cache is read in place (its attention weights beside the token's own), never
        concatenated with the token: a copy of the cache per step would cost more than the
        step. Inference only (no attention dropout)."""
        q, k, v = (self._heads(part.unsqueeze(1)) for part in self.qkv(x).chunk(3, dim=-1))
        scale = q.shape[-1] ** -0.5
        cached = (q @ keys.transpose(-1, -2) * scale).masked_fill(
            ~visible[:, None, None, :], float("-inf"))  # (B, heads, 1, L)
        own = (q * k).sum(-1, keepdim=True) * scale  # (B, heads, 1, 1)
        weights = torch.cat([cached, own], -1).softmax(-1)
        attended = weights[..., :-1] @ values + weights[..., -1:] * v
        return self._finish(x.unsqueeze(1), self._merge(attended)).squeeze(1)


class ADRec(NextItemBackbone):
    """Token-level diffusion of next-item embeddings; batches ``{"history", "target"}``."""

    name: ClassVar[str] = "adrec"
    stochastic_inference: ClassVar[bool] = True

    def __init__(self, config: ADRecConfig, diffusion_config: DiffusionConfig) -> None:
        super().__init__(config, diffusion_config)
        d = config.hidden
        if d % config.num_heads or d % 2:
            raise ValueError(f"hidden ({d}) must be even and a multiple of num_heads "
                             f"({config.num_heads})")
        self.item_embeddings = nn.Embedding(config.n_items + 1, d)  # row n_items: padding
        nn.init.normal_(self.item_embeddings.weight, 0.0, config.embedding_std)
        self.input_dropout = nn.Dropout(config.embedding_dropout)
        self.input_norm = nn.LayerNorm(d, eps=1e-12)
        self.encoder = nn.ModuleList(CausalBlock(config) for _ in range(config.encoder_blocks))
        self.decoder = nn.ModuleList(CausalBlock(config) for _ in range(config.decoder_blocks))
        self.time_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.stage = "full"  # pretraining sets it per epoch (begin_pretrain_epoch)
        self._unpacked: tuple[Tensor, bool, tuple] | None = None  # see _unpack

    # ------------------------------------------------------------------ interface facts

    @property
    def condition_dim(self) -> int:
        c = self.config
        return c.hidden + c.max_len * (2 * c.decoder_blocks * c.hidden + 1)

    @property
    def value_feature_dim(self) -> int:
        return self.config.hidden

    def value_features(self, condition: Tensor | None) -> Tensor | None:
        """r at the last position (B, d): the row's summary, not the cache beside it."""
        return None if condition is None else condition[:, : self.config.hidden]

    # ------------------------------------------------------------------ the networks

    def encode_sequence(self, history: Tensor) -> Tensor:
        """r (B, L, d): the causal encoder over the history's item embeddings."""
        x = self.input_norm(self.input_dropout(self.item_embeddings(history)))
        for block in self.encoder:
            x, _, _ = block(x)
        return x

    def _time(self, t: Tensor) -> Tensor:
        """emb(t) of network timesteps t (...,), rescaled to [0, 1000) as ADRec does."""
        scaled = t.float() * (1000.0 / self.diffusion.steps)
        return self.time_mlp(timestep_embedding(scaled, self.config.hidden))

    def decoder_input(self, rep: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """r + lambda (x_t + emb(t)): how the noisy state enters the decoder (any leading dims)."""
        return rep + self.config.state_scale * (x_t + self._time(t))

    def decode_sequence(self, rep: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0_hat (B, L, d) at every position from r, x_t (B, L, d) and t (B, L)."""
        x = self.decoder_input(rep, x_t, t)
        for block in self.decoder:
            x, _, _ = block(x)
        return x

    # ------------------------------------------------------------------ the reverse process

    def encode(self, batch: Batch) -> Tensor:
        """The per-row condition c (B, condition_dim), flat: [r at the last position (d) |
        the decoder's keys and values of the earlier positions, per block (blocks, 2, L, d) |
        which positions precede the last (L)]. The earlier positions carry their known clean
        targets (the next history item) at t = 0, as ADRec's sampler feeds them."""
        self._unpacked = None
        return self._by_length_group(batch["history"], self._group_condition)

    def _group_condition(self, history: Tensor, last: Tensor) -> Tensor:
        """:meth:`encode`'s c (G, condition_dim) of one group's histories (G, width), trimmed
        to their group's width, whose latest items are at positions ``last`` (G,)."""
        c, d = self.config, self.config.hidden
        (rows, width), length = history.shape, c.max_len
        rep = self.encode_sequence(history)
        known = self.item_embeddings(torch.roll(history, -1, dims=1))  # position j: s_{j+1}
        x = self.decoder_input(rep, known, torch.zeros_like(history))
        kv = []
        for block in self.decoder:
            x, k, v = block(x)
            kv += [block._merge(k), block._merge(v)]
        cache = torch.stack(kv, 1).view(rows, c.decoder_blocks, 2, width, d)
        visible = torch.arange(width, device=history.device)[None] < last[:, None]
        return torch.cat([rep[torch.arange(rows, device=rep.device), last],
                          F.pad(cache, (0, 0, 0, length - width)).flatten(1),
                          F.pad(visible.to(rep.dtype), (0, length - width))], dim=1)

    def _by_length_group(self, history: Tensor,
                         encode_group: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``encode_group(histories, last)`` of each group of :meth:`_length_groups`, its
        histories (G, width) trimmed to the group's width and ``last`` (G,) their latest
        items' positions, put back in ``history``'s row order: (B, ...). Exact: right padding
        is never attended under the causal mask. Histories of another length than the model's
        ``max_len`` are refused."""
        length, pad = history.shape[1], self.config.n_items
        if length != self.config.max_len:
            raise ValueError(f"histories of {length} items, but this {self.name} model was "
                             f"built for max_len = {self.config.max_len}: use data of its own "
                             "environment id")
        last = last_positions(history, pad)
        parts, order = [], []
        for rows, width in self._length_groups(history):
            parts.append(encode_group(history[rows, :width], last[rows]))
            order.append(rows)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def _views(self, condition: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Views of :meth:`encode`'s flat c: r_last (B, d), cache (B, blocks, 2, L, d), the
        visible-position flags (B, L) as floats."""
        c, b = self.config, len(condition)
        d, length, blocks = c.hidden, c.max_len, c.decoder_blocks
        cache = condition[:, d : d + blocks * 2 * length * d].view(b, blocks, 2, length, d)
        return condition[:, :d], cache, condition[:, -length:]

    def _length_groups(self, history: Tensor) -> list[tuple[Tensor, int]]:
        """The rows (G,) of ``history`` (B, L) in each group of :data:`GROUP_WIDTHS` (then L)
        that their history's length fits, with that width; empty groups left out."""
        lengths = (history != self.config.n_items).sum(1)
        length = history.shape[1]
        groups, lower = [], -1
        for width in [w for w in GROUP_WIDTHS if w < length] + [length]:
            rows = ((lengths > lower) & (lengths <= width)).nonzero().squeeze(1)
            if len(rows):
                groups.append((rows, width))
            lower = width
        return groups

    def _unpack(self, condition: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]:
        """c -> r_last (B, d), each decoder block's (keys, values) (B, heads, L, d / heads)
        contiguous, visible (B, L) bool. Kept for the condition last unpacked (and the grad mode
        it was unpacked under, so that a graph is never lost): a chain calls :meth:`predict_x0`
        with the same c at every step, so the cache is laid out for the attention once per
        episode, not once per step. :meth:`encode` drops it."""
        key = (condition, torch.is_grad_enabled())
        if self._unpacked is not None and self._unpacked[0] is key[0] and (
                self._unpacked[1] == key[1]):
            return self._unpacked[2]
        rep, cache, visible = self._views(condition)
        kv = [tuple(block._heads(cache[:, i, j]).contiguous() for j in (0, 1))
              for i, block in enumerate(self.decoder)]
        unpacked = (rep, kv, visible > 0.5)
        self._unpacked = (*key, unpacked)
        return unpacked

    def predict_x0(self, x_t: Tensor, t: Tensor, condition: Tensor | None) -> Tensor:
        """x0_hat (B, d) of the last token at state x_t (B, d), network timesteps t (B,)."""
        rep, kv, visible = self._unpack(condition)
        x = self.decoder_input(rep, x_t, t)
        for block, (keys, values) in zip(self.decoder, kv, strict=True):
            x = block.last_token(x, keys, values, visible)
        return x

    # ------------------------------------------------------------------ training

    def training_rows(self, data: Dataset) -> np.ndarray | None:
        """Every position of a sequence is a target at once: an epoch passes over each training
        sequence's last prefix only (the others are inside it)."""
        return data.sequence_end_rows if isinstance(data, SequenceData) else None

    def begin_pretrain_epoch(self, epoch: int) -> None:
        """Set the stage of pretraining epoch ``epoch``: E trains except in the warm-up."""
        self.stage = self.config.stage(epoch)
        self.item_embeddings.weight.requires_grad_(self.stage != "warmup")

    @property
    def selection_start(self) -> int:
        """The first pretraining epoch whose model may be selected: the full stage's first."""
        return self.config.embedding_epochs + self.config.warmup_epochs + 1

    def training_loss(self, batch: Batch, t: Tensor, generator: torch.Generator) -> Tensor:
        """Per-row loss (B,) over every target token of each row's sequence (the history
        shifted by one, then the row's target), normalised so that the batch mean is the mean
        over the batch's tokens. ``t`` (B,) is the timestep of each row's last token; the
        other tokens draw their own from ``generator``."""
        history, target = batch["history"], batch["target"]
        pad, (b, length) = self.config.n_items, history.shape
        device = history.device
        last = last_positions(history, pad)
        rows = torch.arange(b, device=device)
        targets, has_target = every_position_targets(history, target, last)
        diffused = self.stage != "embeddings"
        if diffused:  # drawn for the whole batch at once: grouping does not change the draws
            steps = torch.randint(0, self.diffusion.steps, (b, length), generator=generator)
            steps = steps.to(device)
            steps[rows, last] = t
            noise = torch.randn((b, length, self.config.hidden), generator=generator).to(device)
        owners, ce, sq = [], [], []
        for group, width in self._length_groups(history):
            real = has_target[group, :width]
            owners.append(group.repeat_interleave(real.sum(1)))  # each token's row, in order
            out = self.encode_sequence(history[group, :width])
            y = targets[group, :width]
            if diffused:
                x0, s = self.item_embeddings(y), steps[group, :width]
                x_t = self.diffusion.q_sample(x0.reshape(-1, x0.shape[-1]), s.reshape(-1),
                                              noise[group, :width].reshape(-1, x0.shape[-1]))
                out = self.decode_sequence(out, x_t.view_as(x0), s)
                sq.append((out[real] - x0[real]).pow(2).mean(-1))
            ce.append(F.cross_entropy(self.scores(out[real]), y[real], reduction="none"))
        owner = torch.cat(owners)
        ce_rows = self._token_mean(torch.cat(ce), owner, b)
        if not diffused:
            return ce_rows
        # ADRec averages the cross-entropy over the batch's tokens, the MSE over each row's
        # tokens (then rows); the two are given equal weight.
        sq_all = torch.cat(sq)
        mse = torch.zeros(b, device=device, dtype=sq_all.dtype).index_add(0, owner, sq_all)
        return 0.5 * (ce_rows + mse / (last + 1))

    @staticmethod
    def _token_mean(per_token: Tensor, owner: Tensor, rows: int) -> Tensor:
        """Per-row sums of ``per_token`` (T,), scaled so that their mean over the ``rows``
        rows is the mean over all T tokens -> (rows,)."""
        summed = torch.zeros(rows, device=per_token.device, dtype=per_token.dtype)
        return summed.index_add(0, owner, per_token) * (rows / max(len(per_token), 1))
