"""DreamRec: the encoder, guidance, its loss, its sampler, and pretraining end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refit_gym.backbones import DreamRec, DreamRecConfig, load_backbone
from refit_gym.cli import main
from refit_gym.diffusion import DiffusionConfig

N, L, D = 20, 5, 8
SCHEDULE = DiffusionConfig(steps=30, schedule="linear")


def _model(**overrides) -> DreamRec:
    torch.manual_seed(0)
    return DreamRec(DreamRecConfig(n_items=N, max_len=L, hidden=D, **overrides), SCHEDULE).eval()


def test_condition_is_the_last_real_position_and_causal() -> None:
    model = _model()
    history = torch.tensor([[3, 4, 5, N, N], [3, 4, 5, 6, 7], [N, N, N, N, N]])
    condition = model.encode({"history": history})
    assert condition.shape == (3, D)
    # Reading the whole output sequence with a loop over rows (DreamRec's extract_axis_1)
    # gives the same vectors: position len - 1, or 0 for an empty history.
    encoder = model.encoder
    real = history != N
    seq = (encoder.item_embeddings(history) + encoder.positions.weight) * real.unsqueeze(-1)
    x = encoder.norm_mid(encoder.attention(encoder.norm_in(seq), seq, real))
    out = encoder.norm_out(encoder.ff_norm(encoder.ff_out(torch.relu(encoder.ff_in(x))) + x)
                           * real.unsqueeze(-1))
    for row, length in enumerate([3, 5, 1]):
        torch.testing.assert_close(condition[row], out[row, length - 1])
    # Causal: items after position 2 do not change what position 2 sees.
    torch.testing.assert_close(out[0, 2], out[1, 2])


def test_guided_prediction_and_scores() -> None:
    model = _model(guidance=3.0)
    x, t = torch.randn(2, D), torch.tensor([5, 29])
    condition = model.encode({"history": torch.tensor([[1, 2, N, N, N], [4, N, N, N, N]])})
    null = model.null_condition.expand(2, D)
    expected = 4.0 * model.denoise(x, condition, t) - 3.0 * model.denoise(x, null, t)
    torch.testing.assert_close(model.predict_x0(x, t, condition), expected)
    scores = model.scores(x)
    assert scores.shape == (2, N)  # the padding row is not an item
    torch.testing.assert_close(scores, x @ model.item_embeddings.weight[:N].T)


def test_training_loss_is_the_x0_mse_to_the_target_embedding() -> None:
    model = _model(cond_dropout=0.0).train()
    model.encoder.dropout.p = 0.0
    batch = {"history": torch.tensor([[1, 2, N, N, N]] * 3), "target": torch.tensor([3, 4, 5])}
    t = torch.tensor([0, 10, 29])
    loss = model.training_loss(batch, t, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    torch.rand(3, generator=generator)  # the condition-dropout draw comes first
    noise = torch.randn(3, D, generator=generator)
    x0 = model.item_embeddings(batch["target"])
    x_t = model.diffusion.q_sample(x0, t, noise)
    expected = (model.denoise(x_t, model.encode(batch), t) - x0).pow(2).mean(-1)
    torch.testing.assert_close(loss, expected)
    loss.mean().backward()
    assert model.item_embeddings.weight.grad[3:6].abs().sum() > 0  # E is trained jointly


def test_a_frozen_item_table_stays_at_its_draw_through_training() -> None:
    model = _model(train_item_table=False).train()
    drawn = model.item_table().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    batch = {"history": torch.tensor([[1, 2, N, N, N]] * 3), "target": torch.tensor([3, 4, 5])}
    for _ in range(3):
        optimizer.zero_grad()
        model.training_loss(batch, torch.tensor([0, 10, 29]),
                            torch.Generator().manual_seed(0)).mean().backward()
        optimizer.step()
    assert torch.equal(model.item_table(), drawn)  # neither the loss nor weight decay moved E
    assert not torch.equal(model.denoiser.weight, _model().denoiser.weight)  # the rest learnt
    assert torch.equal(drawn, _model().item_table())  # the same draw as a trained table's


def test_sampler_is_seeded_and_stochastic_until_the_last_step() -> None:
    model = _model()
    batch = {"history": torch.tensor([[1, 2, N, N, N]] * 4)}
    a = model.generate(batch, generator=torch.Generator().manual_seed(1))
    b = model.generate(batch, generator=torch.Generator().manual_seed(1))
    c = model.generate(batch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, D) and not torch.allclose(a[0], a[1])  # noise per row
    chain = model.diffusion.respaced(5)
    assert model.generate(batch, chain, torch.Generator().manual_seed(1)).shape == (4, D)


def test_pretrain_and_evaluate_seq_synthetic_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "pre"
    report = tmp_path / "pre.json"
    assert main(["pretrain", "--env", "ReFiT-SeqSynthetic-v0", "--seed", "1", "--out", str(out),
                 "--max-epochs", "10", "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert set(result["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (10, 20, 50)}
    assert result["best_epoch"] in (5, 10)
    # The backbone learned from the chain: well above a random ranking's HR@20 of 20/300.
    assert result["test"]["hr@20"] > 1.5 * 20 / 300
    # Three sampling seeds: a real spread, smaller than the metric itself.
    assert 0 <= result["test_std"]["hr@20"] < result["test"]["hr@20"]
    assert result["test_seen"]["rows"] > 0
    model, meta = load_backbone(out / "denoiser.pt")
    assert isinstance(model, DreamRec) and meta["env_id"] == "ReFiT-SeqSynthetic-v0"
    again = tmp_path / "eval.json"
    assert main(["evaluate", "--env", "ReFiT-SeqSynthetic-v0", "--checkpoint",
                 str(out / "denoiser.pt"), "--json", str(again), "--quiet"]) == 0
    assert json.loads(again.read_text())["test"] == pytest.approx(result["test"], abs=1e-12)
    assert np.isfinite(list(result["valid"].values())).all()
