"""ADRec: shapes, the cached last-token decoder, its losses and stages, its sampler's exact
per-step densities, and pretraining end to end on a tiny sequence set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refit_gym.backbones import ADRec, ADRecConfig, load_backbone
from refit_gym.data.sequences import SequenceData, last_items, prefix_rows
from refit_gym.diffusion import DiffusionConfig, GaussianDiffusion
from refit_gym.rl.refit_agent import policy_step

N, L, D = 25, 6, 16
SCHEDULE = DiffusionConfig(steps=8, schedule="linear", beta_start=0.01, beta_end=0.3,
                           reverse_variance="beta")


def _model(**overrides) -> ADRec:
    torch.manual_seed(0)
    config = ADRecConfig(n_items=N, max_len=L, hidden=D, num_heads=2, ff_hidden=32,
                         embedding_epochs=2, warmup_epochs=1, **overrides)
    return ADRec(config, SCHEDULE).eval()


HISTORY = torch.tensor([[3, 4, 5, N, N, N],  # right-padded, oldest first
                        [1, 2, 3, 4, 5, 6],
                        [7, N, N, N, N, N]])
TARGET = torch.tensor([9, 10, 11])


def test_shapes_and_scores_over_the_items_only() -> None:
    model = _model()
    batch = {"history": HISTORY, "target": TARGET}
    condition = model.encode(batch)
    assert condition.shape == (3, model.condition_dim)
    x = torch.randn(3, D)
    assert model.predict_x0(x, torch.tensor([0, 3, 7]), condition).shape == (3, D)
    x0 = model.generate(batch, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (3, D)
    scores = model.scores(x0)
    assert scores.shape == (3, N)  # the padding row is not an item
    torch.testing.assert_close(scores, x0 @ model.item_embeddings.weight[:N].T)


def test_cached_last_token_equals_a_full_causal_pass() -> None:
    # Inference decodes the last token against keys and values cached by encode(); a full
    # pass over the sequence, earlier positions holding their next item at t = 0 and the last
    # one the noisy state, must give the same x0.
    model = _model(state_scale=0.5)  # a large lambda, so that x_t visibly matters
    condition = model.encode({"history": HISTORY})
    x_t, t = torch.randn(3, D), torch.tensor([1, 5, 7])
    cached = model.predict_x0(x_t, t, condition)
    rep = model.encode_sequence(HISTORY)
    lengths = (HISTORY != N).sum(1)
    for row in range(3):
        last = int(lengths[row]) - 1
        known = model.item_embeddings(torch.roll(HISTORY[row], -1))[None].clone()
        known[0, last] = x_t[row]
        steps = torch.zeros(1, L, dtype=torch.long)
        steps[0, last] = t[row]
        full = model.decode_sequence(rep[row : row + 1], known, steps)[0, last]
        torch.testing.assert_close(cached[row], full, rtol=1e-5, atol=1e-5)
    # ... and the state does reach the prediction.
    assert not torch.allclose(cached, model.predict_x0(x_t + 1.0, t, condition))


def test_stages_by_epoch_and_what_each_trains() -> None:
    model = _model()
    assert [model.config.stage(e) for e in range(1, 6)] == [
        "embeddings", "embeddings", "warmup", "full", "full"]
    assert model.selection_start == 4
    model.begin_pretrain_epoch(3)
    assert model.stage == "warmup" and not model.item_embeddings.weight.requires_grad
    model.begin_pretrain_epoch(4)
    assert model.stage == "full" and model.item_embeddings.weight.requires_grad


def _loss(model: ADRec, stage: str, t: torch.Tensor) -> torch.Tensor:
    model.stage = stage
    return model.training_loss({"history": HISTORY, "target": TARGET}, t,
                               torch.Generator().manual_seed(0))


def test_embedding_stage_is_token_mean_cross_entropy_of_the_encoder() -> None:
    model = _model()
    loss = _loss(model, "embeddings", torch.zeros(3, dtype=torch.long))
    rep = model.encode_sequence(HISTORY)
    tokens = [(0, 0, 4), (0, 1, 5), (0, 2, 9), (2, 0, 11)]
    tokens += [(1, j, int(HISTORY[1, j + 1])) for j in range(5)] + [(1, 5, 10)]
    logits = torch.stack([model.scores(rep[r, j]) for r, j, _ in tokens])
    expected = F.cross_entropy(logits, torch.tensor([y for *_, y in tokens]))
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.mean(), expected)


def test_diffusion_stage_loss_and_gradients() -> None:
    model = _model().train()
    for stage, reaches_table in (("warmup", False), ("full", True)):
        model.zero_grad()
        model.begin_pretrain_epoch(3 if stage == "warmup" else 4)
        loss = _loss(model, stage, torch.tensor([0, 4, 7]))
        assert loss.shape == (3,) and bool(torch.isfinite(loss).all())
        loss.mean().backward()
        assert model.decoder[0].qkv.weight.grad is not None
        assert (model.item_embeddings.weight.grad is not None) == reaches_table



def test_diffusion_loss_against_a_hand_computation() -> None:
    # Every token diffuses its target with its own t (the row's last token the given one);
    # loss = (token-mean CE of x0_hat E^T + per-row mean MSE of x0_hat to E[target]) / 2.
    model = _model()
    t = torch.tensor([5, 0, 7])
    with torch.no_grad():
        loss = _loss(model, "full", t)
        generator = torch.Generator().manual_seed(0)
        steps = torch.randint(0, 8, (3, L), generator=generator)
        noise = torch.randn((3, L, D), generator=generator)
        last = torch.tensor([2, 5, 0])
        steps[torch.arange(3), last] = t
        targets = torch.roll(HISTORY, -1, dims=1)
        targets[torch.arange(3), last] = TARGET
        x0 = model.item_embeddings(targets)
        x_t = model.diffusion.q_sample(x0.view(-1, D), steps.view(-1), noise.view(-1, D))
        predicted = model.decode_sequence(model.encode_sequence(HISTORY), x_t.view_as(x0), steps)
        ce, mse = [], torch.zeros(3)
        for row in range(3):
            for j in range(int(last[row]) + 1):
                ce.append(F.cross_entropy(model.scores(predicted[row, j]), targets[row, j]))
                mse[row] += (predicted[row, j] - x0[row, j]).pow(2).mean() / (last[row] + 1)
    expected = 0.5 * (torch.stack(ce).mean() + mse.mean())
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-5, atol=1e-6)


def test_the_item_table_stays_frozen_through_a_warmup_epoch_only(tmp_path) -> None:
    from refit_gym.data import load_dataset
    from refit_gym.training.pretrain import make_timestep_sampler, train_epoch

    spec = _tiny_spec(100, embedding_epochs=1)
    data = load_dataset(spec.dataset)
    torch.manual_seed(0)
    model = spec.build_backbone(data.n_items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sampler = make_timestep_sampler(spec.pretrain, model.diffusion.steps)
    generator = torch.Generator().manual_seed(0)
    before = model.item_embeddings.weight.detach().clone()
    model.begin_pretrain_epoch(2)  # the warm-up
    train_epoch(model, data, optimizer, sampler, spec.pretrain, generator)
    assert torch.equal(model.item_embeddings.weight, before)
    model.begin_pretrain_epoch(3)  # everything trains
    train_epoch(model, data, optimizer, sampler, spec.pretrain, generator)
    assert not torch.equal(model.item_embeddings.weight, before)


def test_a_condition_unpacked_without_gradients_is_not_reused_with_them() -> None:
    model = _model(state_scale=0.5)
    batch = {"history": HISTORY}
    x_t, t = torch.randn(3, D), torch.tensor([1, 2, 3])
    condition = model.encode(batch)
    with torch.no_grad():
        model.predict_x0(x_t, t, condition)
    model.predict_x0(x_t, t, condition).sum().backward()  # reaches the encoder through c
    assert model.encoder[0].qkv.weight.grad is not None
    with pytest.raises(ValueError, match="max_len = 6"):
        model.encode({"history": HISTORY[:, :4]})


def test_fixed_large_variance_and_exact_step_log_probability() -> None:
    chain = GaussianDiffusion(SCHEDULE)
    t = torch.arange(1, 8)
    torch.testing.assert_close(chain.reverse_std(t), chain.betas[t].sqrt())
    model = _model()
    condition = model.encode({"history": HISTORY})
    x_t, steps = torch.randn(3, D), torch.tensor([7, 3, 0])
    action, log_prob, mean = policy_step(model, x_t, steps, condition, kappa=1.0,
                                         generator=torch.Generator().manual_seed(2))
    std = chain.reverse_std(steps)
    plain = torch.distributions.Normal(mean.double(), std[:, None]).log_prob(action.double())
    torch.testing.assert_close(log_prob, plain.sum(-1))
    # The last step's mean is the x0 prediction itself (ADRec returns it unchanged).
    x0 = model.predict_x0(x_t, steps, condition)
    torch.testing.assert_close(mean[2], x0[2])


def test_sequence_end_rows_are_each_sequences_last_prefix() -> None:
    sequences = [np.array([0, 1, 2, 3]), np.array([4, 5]), np.arange(6, 16)]
    history, target = prefix_rows(sequences, 4, 20)
    data = SequenceData("toy", 20, {"train": history, "valid": history[:1], "test": history[:1]},
                        {"train": target, "valid": target[:1], "test": target[:1]})
    ends = data.sequence_end_rows
    assert ends.tolist() == [2, 3, 12]
    np.testing.assert_array_equal(target[ends], [3, 5, 15])
    np.testing.assert_array_equal(history[ends], last_items(
        [s[:-1] for s in sequences], 4, 20))


def test_hold_out_latest_moves_each_sequences_last_row_out_of_training() -> None:
    from refit_gym.mdp.episodes import SequenceEpisodes

    sequences = [np.array([0, 1, 2, 3]), np.array([4, 5]), np.arange(6, 16)]
    history, target = prefix_rows(sequences, 4, 20)
    data = SequenceData("toy", 20, {"train": history, "valid": history[:1], "test": history[:1]},
                        {"train": target, "valid": target[:1], "test": target[:1]})
    held = data.hold_out_latest()
    assert (data.episode_split, held.episode_split) == ("train", "holdout")
    np.testing.assert_array_equal(held.targets["holdout"], [3, 5, 15])
    np.testing.assert_array_equal(held.histories["holdout"], history[[2, 3, 12]])
    assert held.n_train_rows == data.n_train_rows - 3
    assert not np.isin([3, 5, 15], held.targets["train"]).any()  # no model is fit to them
    # The shortened sequences' last prefixes are the new end rows (what ADRec passes over).
    np.testing.assert_array_equal(held.targets["train"][held.sequence_end_rows], [2, 14])
    assert held.transitions().sum() == data.transitions().sum() - 3
    np.testing.assert_array_equal(held.histories["valid"], data.histories["valid"])
    with pytest.raises(ValueError, match="held out already"):
        held.hold_out_latest()
    only_ends = SequenceData("ends", 20, {s: history[[2]] for s in ("train", "valid", "test")},
                             {s: target[[2]] for s in ("train", "valid", "test")})
    with pytest.raises(ValueError, match="nothing to pretrain on"):
        only_ends.hold_out_latest()
    # The MDP's episodes are the held-out rows, and only those.
    source = SequenceEpisodes(held, GaussianDiffusion(SCHEDULE), torch.randn(20, 4))
    assert source.n_episodes == 3
    start = source.start(torch.arange(3), torch.Generator().manual_seed(0))
    assert start.target.argmax(1).tolist() == [3, 5, 15]
    torch.testing.assert_close(start.inputs["history"], torch.from_numpy(
        history[[2, 3, 12]]).long())


def _tiny_spec(sessions: int, embedding_epochs: int, warmup_epochs: int = 1,
               final_sampling_seeds: int = 1, backbone_type: str = "adrec"):
    """ADRec (or ``backbone_type``, a variant with its fields) at toy size on a few of the
    embedded synthetic sessions, 5 epochs at most."""
    from refit_gym.specs import EnvSpec, PretrainConfig, load_env_spec

    base = load_env_spec("ReFiT-SeqSynthetic-v1")
    return EnvSpec(
        id="ADRec-tiny-test", dataset={**base.dataset, "n_sessions": sessions},
        diffusion=SCHEDULE,
        backbone={"type": backbone_type, "max_len": 10, "hidden": 16, "num_heads": 2,
                  "ff_hidden": 32, "embedding_epochs": embedding_epochs,
                  "warmup_epochs": warmup_epochs},
        pretrain=PretrainConfig(lr=1e-3, batch_size=64, importance_sampling=False,
                                eval_every=1, patience=5, max_epochs=5, eval_batch_size=256,
                                selection_metric="hr@20", ks=(10, 20),
                                final_sampling_seeds=final_sampling_seeds))


def test_pretraining_end_to_end_selects_only_in_the_last_stage(tmp_path, monkeypatch) -> None:
    from refit_gym.data import load_dataset
    from refit_gym.training.pretrain import pretrain

    spec = _tiny_spec(300, embedding_epochs=2, final_sampling_seeds=2)
    data = load_dataset(spec.dataset)
    result = pretrain(spec, data, tmp_path / "run", seed=1, progress=False)
    assert [h["epoch"] for h in result.history] == [4, 5]  # stages 1-2 are not evaluated
    assert result.best_epoch in (4, 5)
    model, _ = load_backbone(result.checkpoint, data.n_items)
    assert isinstance(model, ADRec) and model.stage == "full"


def test_length_groups_change_nothing_but_the_cost(monkeypatch) -> None:
    # Rows run through the Transformers in groups trimmed to their width; with no groups
    # (every row at full width) the decoding and the loss are the same (the condition differs
    # only at positions after each row's last, which are never attended).
    import refit_gym.backbones.adrec as adrec

    torch.manual_seed(0)
    model = ADRec(ADRecConfig(n_items=N, max_len=20, hidden=D, num_heads=2, ff_hidden=32,
                              state_scale=0.5), SCHEDULE).eval()
    generator = torch.Generator().manual_seed(3)
    lengths = [1, 3, 8, 9, 16, 17, 20]
    history = torch.full((len(lengths), 20), N)
    for row, length in enumerate(lengths):
        history[row, :length] = torch.randint(0, N, (length,), generator=generator)
    batch = {"history": history, "target": torch.randint(0, N, (len(lengths),))}
    assert [w for _, w in model._length_groups(history)] == [8, 16, 20]
    x_t, t = torch.randn(len(lengths), D), torch.arange(len(lengths))

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        condition = model.encode(batch)
        model.stage = "full"
        loss = model.training_loss(batch, t, torch.Generator().manual_seed(0))
        return model.predict_x0(x_t, t, condition), loss

    grouped = outputs()
    monkeypatch.setattr(adrec, "GROUP_WIDTHS", ())
    assert [w for _, w in model._length_groups(history)] == [20]
    for got, expected in zip(grouped, outputs(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone_type", ["adrec", "adrec_concat"])
def test_staged_pretraining_interrupted_then_rerun_equals_an_uninterrupted_run(
        tmp_path, monkeypatch, backbone_type: str) -> None:
    # The stage follows the epoch, so a run stopped inside the warm-up resumes into the same
    # stages and ends with the same weights; a cap that ends before the last stage is refused.
    # ADRec-Concat inherits all of it.
    import importlib

    # The module, not the function the package exports under the same name.
    pretraining = importlib.import_module("refit_gym.training.pretrain")
    from refit_gym.data import load_dataset
    from refit_gym.training.pretrain import pretrain

    spec = _tiny_spec(200, embedding_epochs=1, warmup_epochs=2, backbone_type=backbone_type)
    data = load_dataset(spec.dataset)
    whole = pretrain(spec, data, tmp_path / "whole", seed=3, progress=False)
    real_epoch, calls = pretraining.train_epoch, []

    def killed_in_epoch_3(*args, **kwargs):  # epochs 1-2 saved; the warm-up is under way
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(pretraining, "train_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(spec, data, tmp_path / "cut", seed=3, progress=False)
    monkeypatch.setattr(pretraining, "train_epoch", real_epoch)
    again = pretrain(spec, data, tmp_path / "cut", seed=3, progress=False)
    assert again.history == whole.history and again.test == whole.test
    first, _ = load_backbone(whole.checkpoint, data.n_items)
    second, _ = load_backbone(again.checkpoint, data.n_items)
    assert first.name == second.name == backbone_type
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"max_epochs \(3\) ends before .* epoch 4"):
        pretrain(spec, data, tmp_path / "short", seed=3, max_epochs=3, progress=False)
