"""Peers against plain references on tiny data, their grids, and their place in the bench."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit_gym.backbones import CheckpointError
from refit_gym.backbones.dreamrec import DreamRecConfig, HistoryEncoder
from refit_gym.backbones.next_item import every_position_targets, last_positions
from refit_gym.data import InteractionData, SequenceData, make_sequential_synthetic
from refit_gym.data.sequences import prefix_rows
from refit_gym.specs import PretrainConfig, load_env_spec
from refit_gym.training.metrics import evaluate
from refit_gym.training.peers import (
    DLAE,
    EASE,
    ItemKNN,
    Markov,
    MostPopular,
    NextItemPopular,
    RP3beta,
    SASRec,
    grid,
    tune_peer,
)
from refit_gym.training.selection import weights_digest


@pytest.fixture
def tiny() -> InteractionData:
    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((12, 9)) < 0.4).astype(np.float32))
    return InteractionData("tiny", train, train, train)


def _history(data: InteractionData) -> dict[str, torch.Tensor]:
    return {"history": torch.from_numpy(data.train.toarray())}


def test_ease_matches_its_closed_form(tiny: InteractionData) -> None:
    x = tiny.train.toarray().astype(np.float64)
    g = x.T @ x + 50.0 * np.eye(9)
    p = np.linalg.inv(g)
    b = np.eye(9) - p / np.diag(p)  # B = I - P diag(1/diag(P)): zero diagonal
    scores = EASE(l2=50.0).fit(tiny, 0).rank_scores(_history(tiny))
    np.testing.assert_allclose(scores.numpy(), x @ b, rtol=1e-4, atol=1e-5)
    dlae = DLAE(dropout=0.5, l2=2.0).fit(tiny, 0).weights.double().numpy()
    gram = x.T @ x
    np.testing.assert_allclose(dlae, np.linalg.solve(gram + np.diag(np.diag(gram) + 2.0), gram),
                               rtol=1e-4, atol=1e-6)


def test_itemknn_matches_a_loop(tiny: InteractionData) -> None:
    x = tiny.train.toarray().astype(np.float64)
    shrink = 2.0
    sims = np.zeros((9, 9))
    for i in range(9):
        for j in range(9):
            if j != i:
                norm = np.linalg.norm(x[:, i]) * np.linalg.norm(x[:, j])
                sims[i, j] = x[:, i] @ x[:, j] / (norm + shrink)
    every = ItemKNN(k=8, shrink=shrink).fit(tiny, 0).weights.toarray()
    np.testing.assert_allclose(every, sims, rtol=1e-5, atol=1e-7)
    top = ItemKNN(k=3, shrink=shrink).fit(tiny, 0).weights.toarray()
    assert ((top > 0).sum(1) <= 3).all()
    kept = top > 0  # each kept entry is the true similarity; the kept ones are a row's largest
    np.testing.assert_allclose(top[kept], sims[kept], rtol=1e-5)
    np.testing.assert_allclose(np.sort(top, 1)[:, -3:], np.sort(sims, 1)[:, -3:], rtol=1e-5)


def test_rp3beta_matches_a_dense_walk(tiny: InteractionData) -> None:
    x = tiny.train.toarray().astype(np.float64)
    p_ui = x / x.sum(1, keepdims=True).clip(min=1)
    p_iu = x.T / x.T.sum(1, keepdims=True).clip(min=1)
    w = (p_iu**0.5) @ (p_ui**0.5) / x.sum(0).clip(min=1) ** 0.3
    np.fill_diagonal(w, 0)
    every = RP3beta(k=8, alpha=0.5, beta=0.3).fit(tiny, 0).weights.toarray()
    np.testing.assert_allclose(every, w, rtol=1e-5, atol=1e-7)
    top = RP3beta(k=4, alpha=0.5, beta=0.3).fit(tiny, 0).weights.toarray()
    assert ((top > 0).sum(1) <= 4).all()
    np.testing.assert_allclose(np.sort(top, 1)[:, -4:], np.sort(w, 1)[:, -4:], rtol=1e-5)


def test_popularity_and_markov_against_counts() -> None:
    pad = 4
    histories = {s: np.array([[0, 1, pad], [1, pad, pad], [pad, pad, pad], [2, pad, pad]])
                 for s in ("train", "valid", "test")}
    targets = {s: np.array([2, 2, 3, 1]) for s in ("train", "valid", "test")}
    data = SequenceData("toy", 4, histories, targets)
    batch = {"history": torch.from_numpy(histories["train"])}
    markov = Markov(smoothing=0.0).fit(data, 0).rank_scores(batch)
    # 1 -> 2 twice (rows 0 and 1), 2 -> 1 once; the empty history gets the popularity prior.
    assert markov[0].argmax() == 2 and markov[1].argmax() == 2 and markov[3].argmax() == 1
    assert markov[0, 2] == pytest.approx(1.0) and markov[2].abs().max() < 1e-6
    smoothed = Markov(smoothing=1.0).fit(data, 0).rank_scores(batch)
    assert smoothed[2].argmax() == 2  # most frequent next item
    cf = InteractionData("t", sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 0]], np.float32)),
                         sp.csr_matrix((2, 3), dtype=np.float32),
                         sp.csr_matrix((2, 3), dtype=np.float32))
    pop = MostPopular().fit(cf, 0).rank_scores({"history": torch.zeros(1, 3)})
    assert pop.argsort(descending=True)[0].tolist() == [1, 0, 2]


def test_grids_come_from_the_toml_and_bad_values_fail() -> None:
    points = grid("ease", "ReFiT-ML1M-v0")
    assert [p["l2"] for p in points] == [100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0]
    assert len(grid("itemknn", "ReFiT-ML1M-v0")) == 12 and grid("pop", "X") == [{}]
    with pytest.raises(ValueError, match="l2 > 0"):
        EASE(l2=0.0)
    with pytest.raises(ValueError, match="0 < dropout < 1"):
        DLAE(dropout=1.0)
    with pytest.raises(ValueError, match="k >= 1"):
        ItemKNN(k=0)
    with pytest.raises(ValueError, match="smoothing"):
        Markov(smoothing=-1.0)


def test_tune_peer_selects_by_validation(small_data: InteractionData) -> None:
    spec = load_env_spec("ReFiT-Synthetic-v0")
    result = tune_peer("ease", spec, small_data)
    best = max(result["grid"], key=lambda point: point["valid"])
    assert result["params"] == best["params"] and result["valid"]["ndcg@20"] == best["valid"]
    assert set(result["test"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    with pytest.raises(ValueError, match="not a collaborative-filtering peer"):
        tune_peer("markov", spec, small_data)


@pytest.fixture(scope="module")
def sessions() -> SequenceData:
    return make_sequential_synthetic(n_items=40, n_communities=4, n_sessions=120, max_len=6,
                                     seed=1)


@pytest.mark.parametrize("every_position", [False, True])
def test_sasrec_is_deterministic_on_one_thread_and_restores_its_best_epoch(
        sessions: SequenceData, every_position: bool) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fits = [SASRec(hidden=16, max_epochs=5, patience=2, lr=3e-3,
                       every_position=every_position).fit(sessions, 7) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    first, second = fits
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name  # bit for bit
    selection = first.selection()
    assert selection == second.selection()
    curve = selection["curve"]
    assert [p["epoch"] for p in curve] == list(range(1, len(curve) + 1))
    assert selection["best_score"] == max(p["score"] for p in curve)
    assert selection["best_epoch"] == next(p["epoch"] for p in curve
                                           if p["score"] == selection["best_score"])
    # The restored weights are the selected epoch's: their digest and their validation score.
    assert weights_digest(first.state_dict()) == selection["weights_sha256"]
    config = PretrainConfig(ks=(20,), eval_batch_size=4096, final_sampling_seeds=1)
    assert evaluate(first, sessions, config)["valid"]["ndcg@20"] == selection["best_score"]
    batch = sessions.batch("test", np.arange(5))
    assert first.rank_scores(batch).shape == (5, sessions.n_items)


def _prefix_data(lengths: list[int], max_len: int, seed: int = 0) -> SequenceData:
    """Random sequences of ``lengths`` over 12 items, every prefix a training row."""
    rng = np.random.default_rng(seed)
    histories, targets = prefix_rows([rng.integers(0, 12, n) for n in lengths], max_len, 12)
    return SequenceData("prefixes", 12, {"train": histories}, {"train": targets})


@pytest.mark.parametrize("lengths, terms", [
    ([2, 5, 7, 3, 7], None),  # no sequence longer than max_len + 1: every row's pair
    ([2, 12, 9], 1 + 6 + 6),  # longer ones: the latest window's 6 positions of each
])
def test_sasrec_every_position_trains_on_the_rows_pairs_of_each_latest_window(
        lengths: list[int], terms: int | None) -> None:
    data = _prefix_data(lengths, max_len=6)
    torch.manual_seed(0)
    sasrec = SASRec(hidden=8, dropout=0.0, every_position=True).build(data).eval()
    windows = data.train_batch(data.sequence_end_rows)
    logits, targets = sasrec._training_logits(windows)
    rows = data.train_batch(np.arange(data.n_train_rows))
    if terms is None:  # the same (prefix, target) pairs: as a multiset, the same losses
        assert len(targets) == data.n_train_rows
        assert sorted(targets.tolist()) == sorted(rows["target"].tolist())
        every = torch.nn.functional.cross_entropy(logits, targets)
        each = torch.nn.functional.cross_entropy(sasrec._logits(rows), rows["target"])
        assert every.item() == pytest.approx(each.item(), rel=1e-5)
    else:
        assert len(targets) == terms < data.n_train_rows
    sasrec.every_position = False  # row by row: each row's ranking scores against its target
    row_logits, row_targets = sasrec._training_logits(windows)
    assert torch.equal(row_targets, windows["target"])
    assert torch.equal(row_logits, sasrec.rank_scores(windows))


def test_sasrec_refuses_an_every_position_that_is_not_a_switch() -> None:
    with pytest.raises(ValueError, match="every_position true or false; .*every_position=1"):
        SASRec(every_position=1)  # a TOML 1 is not a bool


def test_the_encoders_every_position_output_is_that_prefix_alone() -> None:
    data = _prefix_data([7, 4, 6], max_len=6, seed=3)
    config = DreamRecConfig(n_items=12, max_len=6, hidden=8, dropout=0.0)
    torch.manual_seed(1)
    encoder = HistoryEncoder(config, torch.nn.Embedding(13, 8)).eval()
    windows = data.train_batch(data.sequence_end_rows)
    targets, has_target = every_position_targets(
        windows["history"], windows["target"], last_positions(windows["history"], 12))
    rows = data.train_batch(np.arange(data.n_train_rows))
    with torch.no_grad():
        every = encoder.sequence(windows["history"])[has_target]
        alone = encoder(rows["history"])
    # the rows are the windows' prefixes in order: sequences of at most max_len + 1 items
    assert torch.equal(targets[has_target], rows["target"])
    torch.testing.assert_close(every, alone, rtol=1e-5, atol=1e-6)


def test_popularity_ties_are_judged_by_the_metrics_rule() -> None:
    """Items with equal counts score equal (no id order decides): a target level with g - 1
    other items at the top gets HR@1 = 1 / g, whichever id it has."""
    pad = 5
    histories = {s: np.full((4, 2), pad) for s in ("train", "valid", "test")}
    targets = {"train": np.array([0, 3, 3, 1]), "valid": np.array([3, 1, 0, 4]),
               "test": np.array([0, 3, 1, 2])}
    data = SequenceData("toy", 5, histories, targets)
    pop = NextItemPopular().fit(data, 0)
    scores = pop.rank_scores(data.batch("test", np.arange(4)))
    assert scores.shape == (4, 5) and scores[0].tolist() == [1.0, 1.0, 0.0, 2.0, 0.0]
    metrics = evaluate(pop, data, PretrainConfig(ks=(1, 2), final_sampling_seeds=1))
    # Valid targets 3 (alone on top), 1 and 0 (level, second place), 4 (level with 2 at 4th).
    assert metrics["valid"]["hr@1"] == pytest.approx(1 / 4)
    assert metrics["valid"]["hr@2"] == pytest.approx((1 + 0.5 + 0.5) / 4)
    cf_pop = MostPopular().fit(InteractionData(
        "t", sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0]], np.float32)),
        sp.csr_matrix((2, 3), dtype=np.float32), sp.csr_matrix((2, 3), dtype=np.float32)), 0)
    assert cf_pop.rank_scores({"history": torch.zeros(2, 3)}).tolist() == [[2.0, 2.0, 0.0]] * 2


def test_sasrec_prints_a_line_per_epoch_with_its_validation_score(
        sessions: SequenceData, capsys) -> None:
    fit = SASRec(hidden=16, max_epochs=3, patience=3, lr=3e-3).fit(sessions, 2,
                                                                     progress="sasrec probe")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sasrec")]
    curve = fit.selection()["curve"]
    assert len(lines) == len(curve) == 3  # one line an epoch, none for the silent default
    for line, point in zip(lines, curve):
        assert line.startswith(f"sasrec probe: epoch {point['epoch']} (")
        assert f"valid ndcg@20 {point['score']:.5g}" in line
    SASRec(hidden=16, max_epochs=1, patience=3, lr=3e-3).fit(sessions, 2)
    assert capsys.readouterr().err == ""


def test_sasrec_resumes_after_a_kill_as_if_never_stopped(sessions: SequenceData, tmp_path,
                                                         monkeypatch) -> None:
    import refit_gym.training.peers as peers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = SASRec(hidden=16, max_epochs=4, patience=3, lr=3e-3).fit(sessions, 3)
        saves, real_save = [], peers.save_state

        def killed_after_two_epochs(path, payload):
            real_save(path, payload)
            saves.append(payload["epoch"])
            if len(saves) == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(peers, "save_state", killed_after_two_epochs)
        state = tmp_path / "sasrec_state0.pt"
        with pytest.raises(KeyboardInterrupt):
            SASRec(hidden=16, max_epochs=4, patience=3, lr=3e-3).fit(sessions, 3, state)
        resumed = SASRec(hidden=16, max_epochs=4, patience=3, lr=3e-3).fit(sessions, 3, state)
    finally:
        torch.set_num_threads(threads)
    assert saves == [1, 2, 3, 4]  # the resumed fit trained epochs 3 and 4 only
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert resumed.selection() == whole.selection()
    with pytest.raises(CheckpointError, match="another SASRec run's state"):
        SASRec(hidden=16, max_epochs=4, patience=3, lr=1e-3).fit(sessions, 3, state)
