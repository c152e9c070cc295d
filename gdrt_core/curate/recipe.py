"""The sliding-window recipe on integer arrays: k-core, per-user windows, temporal split, sampling.

Pure numpy functions over interaction arrays (one entry per review), so a dump of tens of millions of
reviews is processed without Python objects per review. The recipe follows the LLM4Rec sliding-window
generator (LBR/MSL `generate_data_slidingwindow.py`): drop items without a title, iterative k-core,
chronological per-user sequences, windows of history <= 10, a global temporal split by target time,
and `train.sample(n, random_state=seed)` for the optional training sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOW_RULES = ("bigrec", "all")


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions that survive iterative k-core filtering.

    Repeats until every remaining user and item has >= k interactions (repeated interactions count,
    as pandas `value_counts` does in the reference recipe). users/items: [n] non-negative ints.
    """
    keep = np.ones(len(users), dtype=bool)
    if k <= 1 or len(users) == 0:
        return keep
    num_users = int(users.max()) + 1
    num_items = int(items.max()) + 1
    while True:
        user_counts = np.bincount(users[keep], minlength=num_users)  # [num_users]
        item_counts = np.bincount(items[keep], minlength=num_items)  # [num_items]
        bad_users = user_counts < k
        bad_items = item_counts < k
        drop = keep & (bad_users[users] | bad_items[items])
        if not drop.any():
            return keep
        keep &= ~drop


def first_appearance_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous ids 0..m-1 in order of first appearance (pandas `unique()` order).

    Returns (ids [n], originals [m]) with originals[ids] == values.
    """
    uniques, first_index, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first_index, kind="stable")  # unique positions sorted by first appearance
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[order] = np.arange(len(uniques))
    return rank[inverse.reshape(-1)], uniques[order]


@dataclass
class Windows:
    """Windows over interactions sorted by (user, time): history = positions [start, target)."""

    start: np.ndarray  # [w] first history position (into the sorted interactions)
    target: np.ndarray  # [w] target position
    target_time: np.ndarray  # [w]

    def __len__(self) -> int:
        return len(self.target)

    def take(self, index: np.ndarray) -> Windows:
        return Windows(self.start[index], self.target[index], self.target_time[index])


def user_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Permutation sorting interactions by (user, time); ties keep file order (a stable sort)."""
    return np.lexsort((times, users))


def sliding_windows(
    sorted_users: np.ndarray, sorted_times: np.ndarray, max_history: int = 10, rule: str = "bigrec",
) -> Windows:
    """Windows of each user's chronological sequence, sorted globally by target time (stable).

    rule "bigrec": targets at positions i >= min(max_history, n - 1) of a user's n interactions (the
    LLM4Rec generator: full histories only, and one window for short users); rule "all": every i >= 1.
    History = the up to `max_history` interactions before the target. Ties in target time keep the
    order (user by first position, then position), as the reference's stable sort does.
    """
    if rule not in WINDOW_RULES:
        raise ValueError(f"unknown window rule {rule!r}; expected one of {WINDOW_RULES}")
    n = len(sorted_users)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Windows(empty, empty, empty)
    boundaries = np.flatnonzero(np.diff(sorted_users)) + 1
    user_start = np.concatenate(([0], boundaries))  # [u]
    user_len = np.diff(np.concatenate((user_start, [n])))  # [u]
    if rule == "bigrec":
        first_target = np.minimum(max_history, user_len - 1)
    else:
        first_target = np.ones_like(user_len)
    count = np.maximum(user_len - first_target, 0)  # windows per user [u]
    total = int(count.sum())
    owner = np.repeat(np.arange(len(user_start)), count)  # [w] user of each window
    offset_in_user = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    target_rel = first_target[owner] + offset_in_user
    target = user_start[owner] + target_rel
    start = user_start[owner] + np.maximum(target_rel - max_history, 0)
    windows = Windows(start, target, sorted_times[target])
    return windows.take(np.argsort(windows.target_time, kind="stable"))


def split_bounds(n: int, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> tuple[int, int]:
    """(train_end, valid_end) as the reference: int(n * 0.8), int(n * 0.9); test = the rest."""
    valid_start = round(1.0 - valid_fraction - test_fraction, 12)
    test_start = round(1.0 - test_fraction, 12)
    return int(n * valid_start), int(n * test_start)


def sample_rows(n: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """Row indices of `DataFrame.sample(n=max_rows, random_state=seed)` (None = keep all, in order).

    pandas draws `RandomState(seed).choice(n, size, replace=False)` and keeps that order; so do we,
    which reproduces the published `train_10000.csv` files from `train.csv`.
    """
    if max_rows is None or n <= max_rows:
        return None
    return np.random.RandomState(seed).choice(n, size=max_rows, replace=False)


def covered_popularity(
    sorted_items: np.ndarray, windows: Windows, num_items: int,
) -> np.ndarray:
    """Interactions per item visible in `windows`: each (user, position) counted once. [num_items]

    A window covers the positions start..target of its user's sequence; overlapping windows share
    positions, so the covered set (a difference array over positions) is counted, not the windows.
    """
    n = len(sorted_items)
    delta = np.bincount(windows.start, minlength=n + 1) - np.bincount(windows.target + 1, minlength=n + 1)
    covered = np.cumsum(delta[:n]) > 0  # [n]
    return np.bincount(sorted_items[covered], minlength=num_items)


def history_offsets(windows: Windows) -> np.ndarray:
    """List offsets of the history column (lengths target - start). [w + 1]"""
    lengths = windows.target - windows.start
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def history_values(sorted_items: np.ndarray, windows: Windows, offsets: np.ndarray) -> np.ndarray:
    """The concatenated history item ids of `windows` (oldest first). [offsets[-1]]"""
    lengths = np.diff(offsets)
    positions = np.repeat(windows.start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return sorted_items[positions]


def first_appearance(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each code by first appearance in `codes` [size] (-1 if absent), code of each rank [m])."""
    first = np.full(size, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes), dtype=np.int64))
    present = np.flatnonzero(first < len(codes))
    code_of_rank = present[np.argsort(first[present], kind="stable")]
    rank = np.full(size, -1, dtype=np.int32 if size < 1 << 31 else np.int64)
    rank[code_of_rank] = np.arange(len(code_of_rank))
    return rank, code_of_rank


@dataclass
class Curated:
    """The recipe's result over interaction arrays (see `curate_interactions`)."""

    sorted_users: np.ndarray  # [n] user rank per interaction, sorted by (user, time)
    sorted_items: np.ndarray  # [n] item id 1..N per interaction, same order
    sorted_times: np.ndarray  # [n]
    windows: Windows  # all windows, by target time
    parts: dict[str, Windows]  # train (sampled if asked) / valid / test
    user_of_rank: np.ndarray  # [num kept users] original user code of each rank
    item_of_rank: np.ndarray  # [N] original item code of item id (rank + 1)
    train_end: int  # train windows before sampling
    sample: np.ndarray | None


def curate_interactions(
    arrays: dict[str, np.ndarray], *, num_users: int, num_items: int, k: int = 5,
    max_history: int = 10, rule: str = "bigrec", valid_fraction: float = 0.1, test_fraction: float = 0.1,
    max_train: int | None = None, seed: int = 42,
) -> Curated | None:
    """k-core, first-appearance ids, per-user chronological order, windows, split, sample.

    arrays: {"users", "items", "times"}, [n] each, in file order (titled items only); users/items are
    codes < num_users / num_items. The dict is emptied as the arrays are replaced by smaller ones, so a
    caller that hands its only references over keeps one copy alive. None if nothing survives.
    """
    core = k_core(arrays["users"], arrays["items"], k)
    if not core.all():
        for name in ("users", "items", "times"):
            arrays[name] = arrays[name][core]
    del core
    users, items, times = arrays.pop("users"), arrays.pop("items"), arrays.pop("times")
    if len(users) == 0:
        return None
    user_rank, user_of_rank = first_appearance(users, num_users)
    item_rank, item_of_rank = first_appearance(items, num_items)
    user_ranks = user_rank[users]  # [n]
    del users
    item_ids = (item_rank[items] + 1).astype(np.int32)  # [n] item ids 1..N
    del items, user_rank, item_rank
    t0 = int(times.min())
    if int(times.max()) - t0 < 1 << 31 and len(user_of_rank) < 1 << 31:
        order = np.argsort(user_ranks.astype(np.int64) << 32 | (times - t0), kind="stable")  # one packed key
    else:
        order = user_order(user_ranks, times)
    sorted_users = user_ranks[order]
    del user_ranks
    sorted_items = item_ids[order]
    del item_ids
    sorted_times = times[order]
    del times, order
    windows = sliding_windows(sorted_users, sorted_times, max_history, rule)
    train_end, valid_end = split_bounds(len(windows), valid_fraction, test_fraction)
    parts = {
        "train": windows.take(np.arange(0, train_end)),
        "valid": windows.take(np.arange(train_end, valid_end)),
        "test": windows.take(np.arange(valid_end, len(windows))),
    }
    sample = sample_rows(train_end, max_train, seed)
    if sample is not None:
        parts["train"] = parts["train"].take(sample)
    return Curated(sorted_users, sorted_items, sorted_times, windows, parts, user_of_rank, item_of_rank, train_end, sample)
