"""The catalogue trie: the token paths a recommendation may take, for constrained decoding.

A path is `tokenization.response_token_ids(tokenizer, title)`: the quoted title and EOS, tokenised
together with the response header exactly as the model sees them (one source of truth with the prompt).
Titles shared by several items collapse to one path; the leaf keeps every item id.

Two forms of the same trie:
- `TitleTrie` (numpy, CSR): node 0 is the root; the edges leaving node n are
  `child_tokens[indptr[n]:indptr[n + 1]]` (sorted by token id) leading to
  `child_nodes[indptr[n]:indptr[n + 1]]`. The node reached by EOS is a leaf naming one title.
- `TorchTrie` (`TitleTrie.to_torch`): the same arrays as tensors, with `expand(nodes)` that lists the
  allowed next tokens and child nodes of many beams at once (no Python per beam).

CSR instead of a dense [num_nodes, vocab] mask: the Office catalogue has ~30k nodes, and a dense mask
over a 128k-token vocabulary would need gigabytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gdrt_core.errors import GdrtError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TitleTrie:
    """Prefix trie over the response token paths of a catalogue (see the module docstring)."""

    eos_token_id: int
    indptr: np.ndarray  # [num_nodes + 1] int64, CSR row pointers over edges
    child_tokens: np.ndarray  # [num_edges] int64, token of each edge, sorted within a node
    child_nodes: np.ndarray  # [num_edges] int64, node each edge leads to
    leaf_title_index: np.ndarray  # [num_nodes] int64, index into `titles` for leaves, -1 elsewhere
    titles: tuple[str, ...]  # one entry per distinct path
    title_items: tuple[tuple[int, ...], ...]  # item ids sharing each title, ascending
    max_depth: int  # tokens on the longest path, EOS included

    @property
    def num_nodes(self) -> int:
        return len(self.indptr) - 1

    def allowed_tokens(self, node: int) -> list[int]:
        return self.child_tokens[self.indptr[node]:self.indptr[node + 1]].tolist()

    def child(self, node: int, token: int) -> int | None:
        """The node reached from `node` by `token`, or None if the edge does not exist."""
        lo, hi = int(self.indptr[node]), int(self.indptr[node + 1])
        pos = lo + int(np.searchsorted(self.child_tokens[lo:hi], token))
        if pos < hi and self.child_tokens[pos] == token:
            return int(self.child_nodes[pos])
        return None

    def walk(self, tokens: list[int]) -> int | None:
        """The node reached by `tokens` from the root, or None if they leave the trie."""
        node: int | None = 0
        for t in tokens:
            node = self.child(node, int(t))
            if node is None:
                return None
        return node

    def title_of(self, tokens: list[int]) -> str | None:
        """The title whose full path (EOS included) is `tokens`, else None."""
        node = self.walk(tokens)
        if node is None or self.leaf_title_index[node] < 0:
            return None
        return self.titles[self.leaf_title_index[node]]

    def leaf_titles(self, leaves: list[int]) -> list[str]:
        return [self.titles[self.leaf_title_index[int(n)]] for n in leaves]

    def to_torch(self, device: str | torch.device | None = None) -> TorchTrie:
        import torch

        def t(a: np.ndarray):
            return torch.as_tensor(a, dtype=torch.long, device=device)

        return TorchTrie(
            eos_token_id=self.eos_token_id, indptr=t(self.indptr), child_tokens=t(self.child_tokens),
            child_nodes=t(self.child_nodes), leaf_title_index=t(self.leaf_title_index), trie=self,
        )


@dataclass(frozen=True)
class TorchTrie:
    """`TitleTrie` as tensors on one device, for batched lookups inside the decoding loop."""

    eos_token_id: int
    indptr: torch.Tensor  # [num_nodes + 1] int64
    child_tokens: torch.Tensor  # [num_edges] int64
    child_nodes: torch.Tensor  # [num_edges] int64
    leaf_title_index: torch.Tensor  # [num_nodes] int64
    trie: TitleTrie

    def expand(
        self, nodes: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every allowed continuation of every beam, flattened beam-major, tokens ascending.

        nodes: [rows] node id per beam; active: optional [rows] bool (inactive beams get no edges).
        Returns (row [edges], token [edges], child [edges]).
        """
        import torch

        start = self.indptr[nodes]  # [rows]
        count = self.indptr[nodes + 1] - start  # [rows]
        if active is not None:
            count = torch.where(active, count, torch.zeros_like(count))
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), count)  # [edges]
        first_of_row = torch.cumsum(count, 0) - count  # [rows]
        offset = torch.arange(len(rows), device=nodes.device) - first_of_row[rows]  # [edges]
        edge = start[rows] + offset  # [edges]
        return rows, self.child_tokens[edge], self.child_nodes[edge]


def build_trie(tokenizer, titles: Mapping[int, str]) -> TitleTrie:
    """The trie over `titles` ({item_id: title}); paths from `tokenization.response_token_ids`."""
    from gdrt_core.tokenization import response_token_ids

    eos = tokenizer.eos_token_id
    if eos is None:
        raise GdrtError("the tokenizer has no EOS token; the trie needs it to end titles",
                        hint="set tokenizer.eos_token (the model's end-of-sequence token)")
    by_title: dict[str, list[int]] = {}
    for item_id in sorted(titles):
        by_title.setdefault(titles[item_id], []).append(int(item_id))
    if not by_title:
        raise GdrtError("the catalogue is empty: no titles to build the trie from")

    children: list[dict[int, int]] = [{}]
    leaf_of: dict[int, int] = {}  # leaf node -> title index
    title_list: list[str] = []
    item_lists: list[list[int]] = []
    max_depth = 0
    for title, items in by_title.items():
        path = response_token_ids(tokenizer, title)
        if not path or path[-1] != eos or eos in path[:-1]:
            raise GdrtError(
                f"title {title!r} (item {items[0]}) does not tokenise to a path ending in exactly one EOS",
                hint="remove the tokenizer's special-token text from the title, or fix the tokenizer's EOS",
            )
        node = 0
        for tok in path:
            nxt = children[node].get(tok)
            if nxt is None:
                nxt = len(children)
                children[node][tok] = nxt
                children.append({})
            node = nxt
        if node in leaf_of:
            # Two different strings with one token path (a normalising tokenizer): the model cannot tell
            # them apart, so they are one title; the first (lowest item id) names it.
            item_lists[leaf_of[node]].extend(items)
            continue
        leaf_of[node] = len(title_list)
        title_list.append(title)
        item_lists.append(list(items))
        max_depth = max(max_depth, len(path))

    num_nodes = len(children)
    counts = np.fromiter((len(c) for c in children), dtype=np.int64, count=num_nodes)
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    child_tokens = np.empty(indptr[-1], dtype=np.int64)
    child_nodes = np.empty(indptr[-1], dtype=np.int64)
    for n, c in enumerate(children):
        if c:
            toks = sorted(c)
            child_tokens[indptr[n]:indptr[n + 1]] = toks
            child_nodes[indptr[n]:indptr[n + 1]] = [c[t] for t in toks]
    leaf_title_index = np.full(num_nodes, -1, dtype=np.int64)
    for node, idx in leaf_of.items():
        leaf_title_index[node] = idx
    return TitleTrie(
        eos_token_id=int(eos), indptr=indptr, child_tokens=child_tokens, child_nodes=child_nodes,
        leaf_title_index=leaf_title_index, titles=tuple(title_list),
        title_items=tuple(tuple(sorted(i)) for i in item_lists), max_depth=max_depth,
    )
