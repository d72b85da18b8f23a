"""ADRec-Concat, the project's variant of ADRec: its denoiser reads x_t at full scale beside the
history's representation, it keeps ADRec's encoder, losses and stages, its condition is the
row's summary, and its settings that belong to ADRec are refused."""

from __future__ import annotations

import pytest
import torch

from refit_gym.backbones import (
    ADRec,
    ADRecConfig,
    ConcatADRec,
    ConcatADRecConfig,
    load_backbone,
    save_backbone,
)
from refit_gym.diffusion import DiffusionConfig

N, L, D = 25, 6, 16
SCHEDULE = DiffusionConfig(steps=8, schedule="linear", beta_start=0.01, beta_end=0.3,
                           reverse_variance="beta")
HISTORY = torch.tensor([[3, 4, 5, N, N, N], [1, 2, 3, 4, 5, 6], [7, N, N, N, N, N]])
TARGET = torch.tensor([9, 10, 11])


def _model(**overrides) -> ConcatADRec:
    torch.manual_seed(0)
    config = ConcatADRecConfig(n_items=N, max_len=L, hidden=D, num_heads=2, ff_hidden=32,
                               embedding_epochs=2, warmup_epochs=1, **overrides)
    return ConcatADRec(config, SCHEDULE).eval()


def test_shapes_and_a_condition_that_is_the_rows_summary() -> None:
    model = _model()
    batch = {"history": HISTORY, "target": TARGET}
    condition = model.encode(batch)
    assert model.condition_dim == D and condition.shape == (3, D)
    # r at each row's last history item (an empty history would read position 0).
    rep = model.encode_sequence(HISTORY)
    torch.testing.assert_close(condition, rep[torch.arange(3), torch.tensor([2, 5, 0])],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.value_features(condition), condition)
    x = torch.randn(3, D)
    assert model.predict_x0(x, torch.tensor([0, 3, 7]), condition).shape == (3, D)
    assert model.scores(model.generate(batch, generator=torch.Generator().manual_seed(0))
                        ).shape == (3, N)
    assert not any(True for _ in model.decoder.parameters())  # no Transformer decoder


def test_the_state_reaches_the_prediction_at_full_scale() -> None:
    # ADRec reads x_t as 0.001 (x_t + emb(t)): moving x_t by 1 barely moves x0_hat. The
    # concatenating denoiser reads it as it is.
    x_t, t = torch.randn(3, D), torch.tensor([1, 4, 7])
    moved = {}
    for name, model in (("concat", _model()),
                        ("adrec", ADRec(ADRecConfig(n_items=N, max_len=L, hidden=D, num_heads=2,
                                                    ff_hidden=32), SCHEDULE).eval())):
        condition = model.encode({"history": HISTORY})
        before = model.predict_x0(x_t, t, condition)
        moved[name] = (model.predict_x0(x_t + 1.0, t, condition) - before).norm(dim=1).mean()
    assert moved["concat"] > 0.1
    assert moved["concat"] > 100 * moved["adrec"]


def test_the_denoiser_is_position_wise_over_x_t_r_and_emb_t() -> None:
    # The sequence decoder used in training and the last-token one used by the chain are the
    # same function: each position's x0_hat depends on its own x_t, r and t only.
    model = _model()
    rep, x_t = torch.randn(2, L, D), torch.randn(2, L, D)
    t = torch.randint(0, SCHEDULE.steps, (2, L))
    whole = model.decode_sequence(rep, x_t, t)
    for j in range(L):
        torch.testing.assert_close(whole[:, j], model.predict_x0(x_t[:, j], t[:, j], rep[:, j]))


def test_adrecs_losses_and_stages() -> None:
    model = _model()
    assert model.selection_start == 4
    batch = {"history": HISTORY, "target": TARGET}
    t = torch.tensor([0, 3, 7])
    model.begin_pretrain_epoch(1)
    ce_only = model.training_loss(batch, t, torch.Generator().manual_seed(0))
    model.begin_pretrain_epoch(3)
    assert model.stage == "warmup" and not model.item_embeddings.weight.requires_grad
    warmup = model.training_loss(batch, t, torch.Generator().manual_seed(0))
    assert ce_only.shape == warmup.shape == (3,)
    assert torch.isfinite(warmup).all() and not torch.allclose(ce_only, warmup)
    # The diffused loss is (cross-entropy + MSE) / 2, its gradient reaching the denoiser.
    warmup.mean().backward()
    assert model.denoiser[0].weight.grad.abs().sum() > 0


def test_adrecs_decoder_settings_are_refused_with_the_fix() -> None:
    for bad in ({"decoder_blocks": 2}, {"state_scale": 0.001}):
        with pytest.raises(ValueError, match="type = \"adrec\""):
            _model(**bad)


def test_histories_of_another_length_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="adrec_concat model was built for max_len = 6"):
        _model().encode({"history": HISTORY[:, :5]})


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _model(embedding_std=0.4)
    save_backbone(tmp_path / "m.pt", model, "ReFiT-SeqSynthetic-Concat-v0", seed=0, epoch=0)
    loaded, _ = load_backbone(tmp_path / "m.pt", N)
    loaded.eval()  # loaded in training mode, as every backbone is
    assert isinstance(loaded, ConcatADRec) and loaded.config == model.config
    condition = model.encode({"history": HISTORY})
    x_t, t = torch.randn(3, D), torch.tensor([1, 4, 7])
    torch.testing.assert_close(loaded.predict_x0(x_t, t, loaded.encode({"history": HISTORY})),
                               model.predict_x0(x_t, t, condition))


def test_the_variants_ids_are_registered_and_sequential() -> None:
    from refit_gym.specs import load_env_spec

    for env_id in ("ReFiT-SeqSynthetic-Concat-v0", "ReFiT-Beauty-Concat-v0",
                   "ReFiT-ML1MSeq-Concat-v0"):
        spec = load_env_spec(env_id)
        assert spec.backbone_type == "adrec_concat" and spec.sequential


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_synthetic_id_passes_both_checkers(tmp_path) -> None:
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from refit_gym.mdp.gym_env import cached_dataset
    from refit_gym.specs import load_env_spec

    env_id = "ReFiT-SeqSynthetic-Concat-v0"
    data = cached_dataset(env_id)
    model = load_env_spec(env_id).build_backbone(data.n_items)
    checkpoint = save_backbone(tmp_path / "tiny.pt", model, env_id)
    env = gym.make(env_id, checkpoint=str(checkpoint))
    assert env.observation_space["x"].shape == (64,)
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)
