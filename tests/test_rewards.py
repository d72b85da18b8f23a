"""Each reward against a dense, straightforward computation on small data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refit_gym.data import InteractionData
from refit_gym.mdp.rewards import Propagator, make_reward


def as_data(train) -> InteractionData:
    """A dataset around a training matrix (rewards read only its training split)."""
    return InteractionData("toy", train, train, train)


def _dense_hops(train: np.ndarray, h: np.ndarray, hops: int) -> list[np.ndarray]:
    user_deg, item_deg = train.sum(1), train.sum(0)
    d_i = np.where(item_deg > 0, item_deg, 1.0) ** -0.5 * (item_deg > 0)
    d_u = np.where(user_deg > 0, 1.0 / np.where(user_deg > 0, user_deg, 1.0), 0.0)
    s = np.diag(d_i) @ train.T @ np.diag(d_u) @ train @ np.diag(d_i)
    return [h @ np.linalg.matrix_power(s, k) for k in range(1, hops + 1)]


@pytest.fixture
def problem(small_data):
    train = small_data.train
    rng = np.random.default_rng(0)
    users = rng.integers(0, small_data.n_users, size=6)
    target = torch.from_numpy(train[users].toarray().astype(np.float32))
    x0 = torch.from_numpy(rng.normal(size=target.shape).astype(np.float32))
    return train, target, x0


@pytest.mark.parametrize("rank", [None, 80])
def test_propagation_matches_dense_item_operator(problem, rank) -> None:
    train, target, _ = problem
    hops = Propagator(train, hops=3, rank=rank)(target)  # rank 80 = full rank: exact
    for got, want in zip(hops, _dense_hops(train.toarray(), target.numpy().astype(np.float64), 3)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_lowrank_is_cached_and_close(problem, tmp_path) -> None:
    train, target, _ = problem
    first = Propagator(train, hops=1, rank=20, cache_dir=tmp_path)(target)[0]
    assert len(list(tmp_path.glob("svd-*-r20.npz"))) == 1
    again = Propagator(train, hops=1, rank=20, cache_dir=tmp_path)(target)[0]
    torch.testing.assert_close(first, again)
    exact = Propagator(train, hops=1)(target)[0]
    assert torch.nn.functional.cosine_similarity(first, exact).min() > 0.9


@pytest.mark.parametrize("exclude", [False, True])
def test_collaborative_reward_is_cross_entropy_to_propagated_target(problem, exclude) -> None:
    train, target, x0 = problem
    reward = make_reward("collaborative", {"alphas": [0.3, 0.1], "tau": 0.5,
                                           "exclude_history": exclude,
                                           "propagation": "exact"}, as_data(train))
    history = target if not exclude else torch.zeros_like(target)
    history[:, :10] = target[:, :10] if exclude else history[:, :10]
    rel = reward.relevance(target, history)
    got = reward(x0, rel, history)
    y = target.numpy().astype(np.float64)
    hop1, hop2 = _dense_hops(train.toarray(), y, 2)
    p = y + 0.3 * hop1 + 0.1 * hop2
    logits = x0.numpy().astype(np.float64) / 0.5
    if exclude:
        mask = history.numpy() > 0
        p[mask] = 0
        logits[mask] = -np.inf
    p /= p.sum(1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                  keepdims=True)) - logits.max(1, keepdims=True)
    want = np.where(p > 0, p * np.where(np.isfinite(log_softmax), log_softmax, 0), 0).sum(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    # alpha = 0: the exact multinomial log-likelihood
    plain = make_reward("collaborative", {"tau": 0.5}, as_data(train))
    y_norm = y / y.sum(1, keepdims=True)
    ll = (y_norm * (x0.numpy() / 0.5 - np.log(np.exp(x0.numpy() / 0.5).sum(1, keepdims=True)))
          ).sum(1)
    np.testing.assert_allclose(plain(x0, plain.relevance(target, target), target).numpy(), ll,
                               rtol=1e-4)


def test_ranking_rewards_and_mse(problem) -> None:
    train, target, x0 = problem
    history = torch.zeros_like(target)
    history[:, :5] = 1.0
    hidden = target * (1 - history)
    k = 10
    masked = x0.masked_fill(history > 0, -np.inf).numpy()
    top = np.argsort(-masked, axis=1)[:, :k]
    hit = make_reward("hit", {"k": k}, as_data(train))
    want_hit = np.array([hidden.numpy()[u, top[u]].any() for u in range(len(top))], float)
    np.testing.assert_array_equal(hit(x0, hit.relevance(hidden, history), history).numpy(),
                                  want_hit)
    ndcg = make_reward("ndcg", {"k": k}, as_data(train))
    rel = hidden.numpy()
    disc = 1 / np.log2(np.arange(k) + 2)
    dcg = np.array([(rel[u, top[u]] * disc).sum() for u in range(len(top))])
    idcg = np.array([(np.sort(rel[u])[::-1][:k] * disc).sum() for u in range(len(top))])
    want = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1), 0)
    np.testing.assert_allclose(ndcg(x0, ndcg.relevance(hidden, history), history).numpy(), want,
                               rtol=1e-5)
    graded = make_reward("ndcg", {"k": k, "alphas": [0.5], "propagation": "exact"},
                         as_data(train))
    rel = graded.relevance(hidden, history)
    assert bool((rel[hidden > 0] == 1).all()) and bool((rel[history > 0] == 0).all())
    assert bool((rel[(hidden == 0) & (history == 0)] > 0).any())  # collaborative credit
    mse = make_reward("neg_mse", {}, as_data(train))
    full = (hidden + history).clamp(max=1)
    np.testing.assert_allclose(mse(x0, mse.relevance(hidden, history), history).numpy(),
                               -((x0 - full) ** 2).mean(1).numpy(), rtol=1e-6)


def test_reward_factory_rejects_bad_names_and_parameters(small_data) -> None:
    with pytest.raises(ValueError, match="unknown reward 'ctr'"):
        make_reward("ctr", {}, small_data)
    with pytest.raises(ValueError, match="unknown parameters \\['tau'\\]"):
        make_reward("hit", {"tau": 1.0}, small_data)
    with pytest.raises(ValueError, match="propagation must be"):
        make_reward("collaborative", {"alphas": [1.0], "propagation": "dense"}, small_data)


def _tiny_sequences():
    from refit_gym.data import SequenceData

    pad = 5
    histories = {s: np.array([[0, pad], [1, pad], [0, 1], [2, pad], [3, pad]])
                 for s in ("train", "valid", "test")}
    targets = {s: np.array([1, 2, 2, 0, 3]) for s in ("train", "valid", "test")}
    return SequenceData("toy", 5, histories, targets)


def test_transition_propagation_matches_the_dense_operator() -> None:
    from refit_gym.mdp.rewards import TransitionPropagator

    data = _tiny_sequences()
    counts = data.transitions().toarray().astype(np.float64)
    out_deg, in_deg = counts.sum(1), counts.sum(0)
    d_out = np.where(out_deg > 0, out_deg, 1.0) ** -0.5 * (out_deg > 0)
    d_in = np.where(in_deg > 0, in_deg, 1.0) ** -0.5 * (in_deg > 0)
    s = np.diag(d_out) @ counts @ np.diag(d_in)
    h = torch.eye(5)[[1, 2]]
    hops = TransitionPropagator(data.transitions(), hops=2)(h)
    np.testing.assert_allclose(hops[0].numpy(), h.numpy() @ s, rtol=1e-6)
    np.testing.assert_allclose(hops[1].numpy(), h.numpy() @ s @ s, rtol=1e-6)


def test_sequential_rewards_against_direct_computations() -> None:
    data = _tiny_sequences()
    target = torch.eye(5)[[2, 0]]  # next items 2 and 0, one-hot
    scores = torch.tensor([[0.1, 0.5, 0.3, -1.0, 2.0], [1.0, 0.0, 0.2, 0.4, 0.3]])
    ll = make_reward("collaborative", {"tau": 0.5}, data)
    got = ll(scores, ll.relevance(target, None), None)
    want = torch.log_softmax(scores / 0.5, -1)[[0, 1], [2, 0]]
    torch.testing.assert_close(got, want)
    hit = make_reward("hit", {"k": 2}, data)
    assert hit(scores, hit.relevance(target, None), None).tolist() == [0.0, 1.0]
    graded = make_reward("ndcg", {"k": 3, "alphas": [0.5], "propagation": "exact"}, data)
    rel = graded.relevance(target, None)
    assert rel[0, 2] == 1.0 and rel[0, 0] > 0  # 2 -> 0 is a training transition
    assert rel[0, 4] == 0.0
    # Row 0 ranks items 4, 1, 2: DCG = rel_2 / log2(4); IDCG over the top-3 relevances.
    ideal = rel[0].sort(descending=True).values[:3]
    expected = rel[0, 2] / np.log2(4) / (ideal / torch.log2(torch.arange(3) + 2.0)).sum()
    assert graded(scores, rel, None)[0].item() == pytest.approx(expected.item(), rel=1e-6)
    embeddings = torch.randn(5, 3)
    mse = make_reward("neg_mse", {}, data, item_embeddings=embeddings)
    assert mse.on_state
    x0 = torch.randn(2, 3)
    torch.testing.assert_close(mse(x0, mse.relevance(target, None), None),
                               -(x0 - embeddings[[2, 0]]).pow(2).mean(-1))
    with pytest.raises(ValueError, match="exact"):
        make_reward("ndcg", {"alphas": [0.5]}, data)


def test_transition_weight_credits_what_follows_the_last_history_item() -> None:
    data = _tiny_sequences()  # training transitions 0 -> 1, 1 -> 2 (twice), 2 -> 0, 3 -> 3
    pad = data.n_items
    history = torch.tensor([[0, 1], [4, pad], [pad, pad]])  # last items 1, 4 (never followed), none
    target = torch.eye(5)[[0, 3, 1]]
    reward = make_reward("collaborative", {"tau": 0.5, "transition_weight": 1.0}, data)
    rel = reward.relevance(target, None, {"history": history})
    want = torch.stack([(torch.eye(5)[0] + torch.eye(5)[2]) / 2, torch.eye(5)[3], torch.eye(5)[1]])
    torch.testing.assert_close(rel, want)
    scores = torch.randn(3, 5)
    torch.testing.assert_close(reward(scores, rel, None),
                               (want * torch.log_softmax(scores / 0.5, -1)).sum(-1))
    with pytest.raises(ValueError, match="inputs"):
        reward.relevance(target, None)
    for bad in (-0.5, float("inf"), float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="transition_weight must be a finite number"):
            make_reward("collaborative", {"transition_weight": bad}, data)


def test_transition_weight_is_refused_for_collaborative_filtering(problem) -> None:
    train, _, _ = problem
    with pytest.raises(ValueError, match="sequential"):
        make_reward("collaborative", {"transition_weight": 0.5}, as_data(train))


def test_factor_cache_name_carries_its_format(problem, monkeypatch) -> None:
    import refit_gym.mdp.rewards as rewards

    train = problem[0]
    name = rewards.factors_cache_name(train, 20)
    assert name.startswith("svd-") and name.endswith("-r20.npz")
    monkeypatch.setattr(rewards, "FACTORS_FORMAT", rewards.FACTORS_FORMAT + 1)
    assert rewards.factors_cache_name(train, 20) != name


def test_the_factorisation_is_announced_once_and_a_cache_hit_is_silent(problem, tmp_path,
                                                                         capsys) -> None:
    train = problem[0]
    Propagator(train, hops=1, rank=20, cache_dir=tmp_path)
    lines = capsys.readouterr().err.splitlines()
    (path,) = tmp_path.glob("svd-*-r20.npz")
    n_users, n_items = train.shape
    assert lines == [f"reward: computing the rank-20 factors of the {n_users} x {n_items} "
                     f"interaction graph once (cached in {path})"]
    Propagator(train, hops=1, rank=20, cache_dir=tmp_path)  # read back: nothing to announce
    assert capsys.readouterr().err == ""
