"""The catalogue trie: exactly the catalogue titles, tokenised as the model sees them after the header."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.prompts import render
from gdrt_core.tokenization import TARGET, response_token_ids, tokenize_example, tokenize_prompt
from gdrt_core.trie import build_trie

OFFICE_TITLES = Path(__file__).resolve().parents[2] / "data" / "office" / "id2name4Rec.json"


@pytest.fixture(scope="module")
def office_titles() -> dict[int, str]:
    return {int(k): v for k, v in json.loads(OFFICE_TITLES.read_text(encoding="utf-8")).items()}


@pytest.fixture(scope="module")
def tokenizer(office_titles):
    from gdrt_core.embedded import tokenizer_corpus, train_tokenizer

    titles = sorted(set(office_titles.values()))
    return train_tokenizer(tokenizer_corpus(titles, [(titles[:3], titles[3])]), 1024)


@pytest.fixture(scope="module")
def trie(tokenizer, office_titles):
    return build_trie(tokenizer, office_titles)


def _all_paths(trie) -> dict[tuple[int, ...], int]:
    """Every root-to-leaf token path of the trie -> its leaf node (iterative DFS over the CSR arrays)."""
    paths, stack = {}, [(0, ())]
    while stack:
        node, prefix = stack.pop()
        lo, hi = trie.indptr[node], trie.indptr[node + 1]
        if lo == hi:
            paths[prefix] = node
        for token, child in zip(trie.child_tokens[lo:hi].tolist(), trie.child_nodes[lo:hi].tolist(), strict=True):
            stack.append((child, (*prefix, token)))
    return paths


def test_every_title_reachable_and_nothing_else(trie, tokenizer, office_titles):
    distinct = set(office_titles.values())
    expected = {tuple(response_token_ids(tokenizer, t)): t for t in distinct}
    paths = _all_paths(trie)
    assert set(paths) == set(expected)  # no extra path, none missing
    for path, leaf in paths.items():
        assert trie.leaf_title_index[leaf] >= 0
        assert trie.titles[trie.leaf_title_index[leaf]] == expected[path]
        assert path[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in path[:-1]
    assert sorted(trie.titles) == sorted(distinct)
    assert trie.max_depth == max(len(p) for p in expected)
    # only leaves are marked, and every leaf is reached by EOS
    assert (trie.leaf_title_index >= 0).sum() == len(distinct)
    eos_children = trie.child_nodes[trie.child_tokens == tokenizer.eos_token_id]
    assert set(eos_children.tolist()) == set(paths.values())


def test_duplicate_titles_collapse_and_keep_item_ids(trie, office_titles):
    by_title: dict[str, list[int]] = {}
    for item, title in office_titles.items():
        by_title.setdefault(title, []).append(item)
    shared = {t: ids for t, ids in by_title.items() if len(ids) > 1}
    assert shared, "the Office catalogue has titles shared by several items"
    for title, ids in shared.items():
        assert trie.titles.count(title) == 1
        assert trie.title_items[trie.titles.index(title)] == tuple(sorted(ids))
    assert len(trie.titles) == len(by_title) < len(office_titles)


def test_walk_rejects_non_titles(trie, tokenizer):
    title = trie.titles[0]
    path = response_token_ids(tokenizer, title)
    assert trie.title_of(path) == title
    assert trie.title_of(path[:-1]) is None  # a prefix is not a title
    assert trie.walk([*path[:-1], tokenizer.pad_token_id]) is None  # off the trie
    assert trie.title_of(response_token_ids(tokenizer, title + " (not in the catalogue)")) is None


def test_header_tokenisation_matches_the_prompt(tokenizer, office_titles):
    """The trie path of a target equals the target tokens of the full training example, and the prompt
    alone (inference input) is exactly the example's tokens before them."""
    titles = list(office_titles.values())
    for i in range(0, 200, 7):
        history, target = titles[i:i + 5], titles[i + 5]
        rendered = render("office", history, target)
        example = tokenize_example(tokenizer, rendered)
        target_ids = [t for t, r in zip(example.input_ids, example.role, strict=True) if r == TARGET]
        assert target_ids == response_token_ids(tokenizer, target)
        prompt = tokenize_prompt(tokenizer, render("office", history))
        assert example.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        assert len(prompt.input_ids) + len(target_ids) == len(example.input_ids)


def test_torch_expand_lists_allowed_tokens_of_many_beams(trie):
    import torch

    rng = np.random.default_rng(0)
    nodes = rng.integers(0, trie.num_nodes, size=64)
    active = rng.random(64) < 0.8
    tt = trie.to_torch()
    rows, tokens, children = tt.expand(torch.as_tensor(nodes), torch.as_tensor(active))
    expected = [
        (r, tok, trie.child(int(n), tok))
        for r, (n, a) in enumerate(zip(nodes, active, strict=True)) if a
        for tok in trie.allowed_tokens(int(n))
    ]
    assert list(zip(rows.tolist(), tokens.tolist(), children.tolist(), strict=True)) == expected


def test_tokenizer_without_eos_is_a_clear_error(office_titles):
    class NoEos:
        eos_token_id = None

    with pytest.raises(GdrtError, match="EOS"):
        build_trie(NoEos(), office_titles)
