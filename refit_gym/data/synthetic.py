"""Seeded synthetic datasets with community structure: a collaborative-filtering one
(:func:`make_synthetic`) and a sequential one (:func:`make_sequential_synthetic`).

Users and items get latent vectors drawn around shared community centres, items a popularity
bias; each user picks items without replacement with probability proportional to
exp(affinity) (Gumbel-top-k), so co-interaction (the collaborative signal) is informative. Each
user's interactions are put in a random "time" order and the latest go to test, the ones before
to valid, as in DiffRec's chronological splits; with ``drift`` the latest fraction of a user's
interactions comes from the next community's interest instead.
"""

from __future__ import annotations

import numpy as np

from refit_gym.data.interactions import (
    InteractionData,
    order_matrix,
    pairs_to_csr,
    rank_within_user,
)
from refit_gym.data.sequences import SequenceData, prefix_rows


def make_synthetic(
    n_users: int = 600,
    n_items: int = 400,
    n_communities: int = 8,
    mean_interactions: int = 40,
    latent_dim: int = 16,
    affinity_scale: float = 3.0,
    valid_fraction: float = 0.2,
    test_fraction: float = 0.1,
    drift: float = 0.0,
    seed: int = 0,
    name: str = "synthetic",
) -> InteractionData:
    """Generate a dataset; the same arguments always give the same matrices.

    ``drift``: the fraction of each user's interactions, the latest in time, drawn around the
    *next* community's centre (community c -> c + 1) instead of the user's own: a systematic
    interest drift. A bag-of-items model trained to reconstruct the whole history (DiffRec,
    EASE) sees no time, while validation and test hold the latest interactions. 0 draws exactly
    what earlier versions drew.

    Memory is O(chunk x n_items) for the sampling, never n_users x n_items.
    """
    if min(n_users, n_items, n_communities, mean_interactions) < 1:
        raise ValueError("n_users, n_items, n_communities and mean_interactions must be >= 1")
    if mean_interactions * 2 > n_items:
        raise ValueError(f"mean_interactions={mean_interactions} needs n_items >= twice that")
    if not 0.0 <= drift < 1.0:
        raise ValueError(f"drift must be in [0, 1), got {drift}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_communities, latent_dim))
    community = rng.integers(n_communities, size=n_users)
    user_vec = centres[community] + 0.7 * rng.normal(size=(n_users, latent_dim))
    item_vec = centres[rng.integers(n_communities, size=n_items)]
    item_vec = item_vec + 0.7 * rng.normal(size=(n_items, latent_dim))
    popularity = rng.normal(0.0, 1.0, size=n_items)
    counts = np.clip(
        np.round(mean_interactions * rng.lognormal(-0.125, 0.5, size=n_users)), 5, n_items // 2
    ).astype(np.int64)

    late_vec = None
    n_late = np.zeros(n_users, dtype=np.int64)
    if drift > 0:  # drawn only then, so drift 0 keeps the earlier stream
        late_vec = centres[(community + 1) % n_communities] + 0.7 * rng.normal(
            size=(n_users, latent_dim))
        n_late = np.round(drift * counts).astype(np.int64)

    users_out, items_out, late_out = [], [], []
    chunk = max(1, (1 << 22) // n_items)
    for start in range(0, n_users, chunk):
        rows = slice(start, min(start + chunk, n_users))
        early = counts[rows] - n_late[rows]
        picked = _gumbel_top(rng, user_vec[rows], item_vec, popularity, affinity_scale, early)
        users_out.append(picked[0] + start)
        items_out.append(picked[1])
        late_out.append(np.zeros(len(picked[0]), dtype=bool))
        if late_vec is not None:
            late = _gumbel_top(rng, late_vec[rows], item_vec, popularity, affinity_scale,
                               n_late[rows], exclude=picked)
            users_out.append(late[0] + start)
            items_out.append(late[1])
            late_out.append(np.ones(len(late[0]), dtype=bool))
    users = np.concatenate(users_out)
    items = np.concatenate(items_out)
    is_late = np.concatenate(late_out)

    # A random time order per user (drifted interactions after the others); the latest
    # interactions are held out.
    order = np.lexsort((rng.random(len(users)), is_late, users))
    users, items = users[order], items[order]
    n = counts[users]
    rank = rank_within_user(users)
    n_test = np.maximum(1, np.round(n * test_fraction))
    n_valid = np.maximum(1, np.round(n * valid_fraction))
    split = np.where(rank >= n - n_test, 2, np.where(rank >= n - n_test - n_valid, 1, 0))
    shape = (n_users, n_items)
    train, valid, test = (
        pairs_to_csr(users[split == k], items[split == k], shape, f"synthetic ({s})")
        for k, s in enumerate(("train", "valid", "test"))
    )
    in_train = split == 0
    return InteractionData(name, train, valid, test,
                           order_matrix(users[in_train], items[in_train], shape))


def _gumbel_top(rng: np.random.Generator, users: np.ndarray, item_vec: np.ndarray,
                popularity: np.ndarray, scale: float, counts: np.ndarray,
                exclude: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``counts`` items drawn without replacement with probability proportional to
    exp(affinity + popularity) (Gumbel-top-k), none of the (row, item) pairs ``exclude``; returns
    (row, item) index arrays, row-major, each row's items in draw order."""
    affinity = scale * (users @ item_vec.T) / np.sqrt(users.shape[1])
    keys = affinity + popularity - np.log(-np.log(rng.random(affinity.shape)))
    if exclude is not None:
        keys[exclude] = -np.inf
    ranked = np.argsort(-keys, axis=1)
    take = np.arange(keys.shape[1]) < counts[:, None]
    return np.nonzero(take)[0], ranked[take]


def make_sequential_synthetic(
    n_items: int = 300,
    n_communities: int = 6,
    n_sessions: int = 2000,
    mean_length: float = 8.0,
    successors: int = 5,
    stay: float = 0.85,
    max_len: int = 10,
    seed: int = 0,
    name: str = "seq-synthetic",
) -> SequenceData:
    """Sessions walked on an item Markov chain with communities; every prefix is a row.

    Each item has ``successors`` favoured next items in its own community (Dirichlet weights);
    a step follows them with probability ``stay``, else jumps to a popularity-weighted item of
    any community. Sessions are split 8:1:1 in order (the "time" order), each session's prefixes
    becoming rows of its split, so both the history and the item graph carry signal.
    """
    if min(n_items, n_communities, n_sessions, successors, max_len) < 1 or mean_length < 2:
        raise ValueError("sizes must be >= 1 and mean_length >= 2")
    if n_items < n_communities * successors:
        raise ValueError(f"n_items={n_items} too small for {n_communities} communities of "
                         f">= {successors} items")
    rng = np.random.default_rng(seed)
    community = np.arange(n_items) % n_communities
    members = [np.flatnonzero(community == c) for c in range(n_communities)]
    popularity = rng.dirichlet(np.full(n_items, 0.5))
    next_items = np.stack([rng.choice(members[c], successors, replace=False) for c in community])
    next_cum = np.cumsum(rng.dirichlet(np.ones(successors), size=n_items), axis=1)
    lengths = np.maximum(2, rng.poisson(mean_length - 2, n_sessions) + 2)
    longest = int(lengths.max())
    walk = np.empty((n_sessions, longest), dtype=np.int64)
    walk[:, 0] = rng.choice(n_items, n_sessions, p=popularity)
    for step in range(1, longest):  # over positions, vectorised over sessions
        current = walk[:, step - 1]
        pick = (rng.random((n_sessions, 1)) > next_cum[current]).sum(1).clip(max=successors - 1)
        jump = rng.choice(n_items, n_sessions, p=popularity)
        walk[:, step] = np.where(rng.random(n_sessions) < stay,
                                 next_items[current, pick], jump)
    sessions = [walk[i, : lengths[i]] for i in range(n_sessions)]
    bounds = np.round(np.array([0.8, 0.9]) * n_sessions).astype(int)
    histories, targets = {}, {}
    for split, part in zip(("train", "valid", "test"), np.split(np.arange(n_sessions), bounds)):
        histories[split], targets[split] = prefix_rows([sessions[i] for i in part], max_len,
                                                       n_items)
    return SequenceData(name, n_items, histories, targets)
