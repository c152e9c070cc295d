"""The sliding-window recipe (gdrt_core.curate.recipe): hand-derived cases, properties, and a reference port."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gdrt_core.curate import recipe


def test_k_core_is_iterative():
    """k=2. Interactions (user, item): (0,0) (0,1) (1,1) (1,2) (2,2).

    Round 1: user 2 has 1 interaction, item 0 has 1 -> drop (0,0) and (2,2). Round 2: user 0 has 1
    ((0,1)), item 2 has 1 ((1,2)) -> drop both. Round 3: (1,1) alone: user 1 and item 1 have 1 -> drop.
    Nothing survives, which one round of filtering would not show.
    """
    users = np.array([0, 0, 1, 1, 2])
    items = np.array([0, 1, 1, 2, 2])
    assert recipe.k_core(users, items, 2).tolist() == [False] * 5
    assert recipe.k_core(users, items, 1).tolist() == [True] * 5


def test_k_core_counts_repeats():
    """A repeated purchase counts twice (pandas value_counts): user 0 buys item 0 twice -> 2-core holds."""
    assert recipe.k_core(np.array([0, 0]), np.array([0, 0]), 2).tolist() == [True, True]


def test_sliding_windows_bigrec_and_all():
    """One user with 5 interactions at times 10..50, max_history 2.

    bigrec: targets i >= min(2, 4) = 2 -> (start, target) = (0,2), (1,3), (2,4).
    all: targets i >= 1 -> (0,1), (0,2), (1,3), (2,4).
    A user with 2 interactions under bigrec: i >= min(2, 1) = 1 -> one window (0, 1).
    """
    users = np.zeros(5, dtype=np.int64)
    times = np.array([10, 20, 30, 40, 50])
    w = recipe.sliding_windows(users, times, 2, "bigrec")
    assert list(zip(w.start.tolist(), w.target.tolist(), strict=True)) == [(0, 2), (1, 3), (2, 4)]
    w = recipe.sliding_windows(users, times, 2, "all")
    assert list(zip(w.start.tolist(), w.target.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 3), (2, 4)]
    w = recipe.sliding_windows(np.zeros(2, dtype=np.int64), np.array([1, 2]), 2, "bigrec")
    assert list(zip(w.start.tolist(), w.target.tolist(), strict=True)) == [(0, 1)]


def test_split_bounds_match_reference():
    """19,250 Office windows: int(19250*0.8) = 15400, int(19250*0.9) = 17325 -> 15400 / 1925 / 1925."""
    assert recipe.split_bounds(19250) == (15400, 17325)


def test_sample_rows_is_pandas_sample():
    """DataFrame.sample(n=3, random_state=7) draws RandomState(7).choice(10, 3, replace=False)."""
    expected = np.random.RandomState(7).choice(10, size=3, replace=False)
    assert recipe.sample_rows(10, 3, 7).tolist() == expected.tolist()
    assert recipe.sample_rows(10, 10, 7) is None


def test_covered_popularity_counts_positions_once():
    """Sequence items [5, 6, 5, 7] (one user); windows (0..2) and (1..3) cover positions 0-3 once each:
    item 5 twice (positions 0 and 2), 6 once, 7 once; a window (0..1) alone covers items 5 and 6."""
    items = np.array([5, 6, 5, 7])
    both = recipe.Windows(np.array([0, 1]), np.array([2, 3]), np.array([0, 0]))
    assert recipe.covered_popularity(items, both, 8).tolist() == [0, 0, 0, 0, 0, 2, 1, 1]
    first = recipe.Windows(np.array([0]), np.array([1]), np.array([0]))
    assert recipe.covered_popularity(items, first, 8).tolist() == [0, 0, 0, 0, 0, 1, 1, 0]


def reference_recipe(reviews, k, max_history, valid_fraction=0.1, test_fraction=0.1, ids_out=None):
    """A plain-Python port of the LLM4Rec generator (generate_data_slidingwindow.py) for comparison.

    reviews: [(user, item, time)] in file order (titled items only). Returns {split: [(user, hist, target, time)]};
    `ids_out` (a dict) receives {item: id}.
    """
    rows = list(reviews)
    while k > 1:
        user_counts = Counter(u for u, _, _ in rows)
        item_counts = Counter(i for _, i, _ in rows)
        bad_users = {u for u, c in user_counts.items() if c < k}
        bad_items = {i for i, c in item_counts.items() if c < k}
        if not bad_users and not bad_items:
            break
        rows = [r for r in rows if r[0] not in bad_users and r[1] not in bad_items]
    item_id: dict = {}
    sequences: dict = {}
    for u, i, t in rows:
        item_id.setdefault(i, len(item_id) + 1)
        sequences.setdefault(u, []).append((item_id[i], t))
    if ids_out is not None:
        ids_out.update(item_id)
    windows = []
    for u, seq in sequences.items():
        seq = sorted(seq, key=lambda x: x[1])
        for i in range(min(max_history, len(seq) - 1), len(seq)):
            windows.append((u, [x for x, _ in seq[max(i - max_history, 0):i]], seq[i][0], seq[i][1]))
    windows.sort(key=lambda w: w[3])
    n = len(windows)
    a = int(n * round(1 - valid_fraction - test_fraction, 12))
    b = int(n * round(1 - test_fraction, 12))
    return {"train": windows[:a], "valid": windows[a:b], "test": windows[b:]}


def run_recipe(reviews, k, max_history, **kw):
    users = np.array([u for u, _, _ in reviews], dtype=np.int64)
    items = np.array([i for _, i, _ in reviews], dtype=np.int64)
    times = np.array([t for _, _, t in reviews], dtype=np.int64)
    curated = recipe.curate_interactions(
        {"users": users, "items": items, "times": times},
        num_users=int(users.max(initial=0)) + 1, num_items=int(items.max(initial=0)) + 1,
        k=k, max_history=max_history, **kw,
    ) if len(reviews) else None
    return curated


def as_rows(curated) -> dict:
    out = {}
    for name, w in curated.parts.items():
        out[name] = [
            (int(curated.user_of_rank[curated.sorted_users[t]]),
             curated.sorted_items[s:t].tolist(), int(curated.sorted_items[t]), int(curated.sorted_times[t]))
            for s, t in zip(w.start.tolist(), w.target.tolist(), strict=True)
        ]
    return out


review_lists = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 9), st.integers(0, 30)), min_size=0, max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(reviews=review_lists, k=st.integers(1, 4), max_history=st.integers(1, 5))
def test_recipe_matches_reference_port(reviews, k, max_history):
    """Same windows, ids, order and splits as the reference generator on random dumps (ties included)."""
    curated = run_recipe(reviews, k, max_history)
    expected = reference_recipe(reviews, k, max_history)
    if curated is None:
        assert sum(len(v) for v in expected.values()) == 0
        return
    assert as_rows(curated) == expected


@settings(max_examples=150, deadline=None)
@given(
    reviews=review_lists, k=st.integers(1, 4), max_history=st.integers(1, 10),
    rule=st.sampled_from(["bigrec", "all"]), max_train=st.one_of(st.none(), st.integers(1, 20)),
)
def test_recipe_properties(reviews, k, max_history, rule, max_train):
    """Later splits never have a target time earlier than the previous split's latest; histories are
    one user's earlier interactions in time order and <= max_history long; k-core holds."""
    curated = run_recipe(reviews, k, max_history, rule=rule, max_train=max_train)
    if curated is None:
        return
    su, si, st_ = curated.sorted_users, curated.sorted_items, curated.sorted_times
    # k-core holds on what is kept
    assert min(Counter(su.tolist()).values()) >= k
    assert min(Counter(si.tolist()).values()) >= k
    latest = None
    for name in ("train", "valid", "test"):
        w = curated.parts[name]
        if name == "train" and max_train is not None:
            assert len(w) <= max_train
        if len(w) == 0:
            continue
        if latest is not None:
            assert w.target_time.min() >= latest
        latest = max(latest or w.target_time.max(), w.target_time.max())
        for s, t in zip(w.start.tolist(), w.target.tolist(), strict=True):
            assert 0 <= t - s <= max_history
            assert (su[s:t + 1] == su[t]).all()  # one user
            assert (np.diff(st_[s:t + 1]) >= 0).all()  # chronological, target last


def load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_curate.py"
    spec = importlib.util.spec_from_file_location("bench_curate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_amazon2014_end_to_end_matches_reference_port(tmp_path):
    """A generated 3,000-review dump with the default recipe (5-core, history <= 10, 80/10/10, 5 groups):
    the Dataset equals the reference port run on the same lines (parsed with json / ast), titles included."""
    import ast
    import html
    import json

    from gdrt_core.curate import CurateConfig, run
    from gdrt_core.dataset import Dataset

    reviews_path, meta_path = load_bench().generate_dump(tmp_path, 3000, seed=1)
    run(CurateConfig(source=str(reviews_path), format="amazon2014", domain="office", out=str(tmp_path / "ds")))
    ds = Dataset(tmp_path / "ds")

    titles = {}
    for line in meta_path.read_text().splitlines():
        meta = ast.literal_eval(line)
        if "title" in meta and len(meta["title"]) > 1:
            titles[meta["asin"]] = html.unescape(meta["title"].strip())
    reviews = [json.loads(line) for line in reviews_path.read_text().splitlines()]
    kept = [(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in reviews if r["asin"] in titles]
    item_id: dict = {}
    expected = reference_recipe(kept, 5, 10, ids_out=item_id)
    assert sum(len(rows) for rows in expected.values()) > 100, "the generated dump should survive the 5-core"
    for split, rows in expected.items():
        got = ds.split(split).to_pydict()
        assert got["user_id"] == [w[0] for w in rows]
        assert got["history"] == [w[1] for w in rows]
        assert got["target"] == [w[2] for w in rows]
        assert got["timestamp"] == [w[3] for w in rows]
    assert ds.titles == {i: titles[asin] for asin, i in item_id.items()}
    assert any("&" in t for t in ds.titles.values()) and not any("&amp;" in t for t in ds.titles.values())
