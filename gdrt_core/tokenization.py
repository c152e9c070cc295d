"""Tokenising rendered examples with exact token roles (method.md §2).

Roles come from the character spans of `prompts.render` and the tokenizer's offset mapping, never from
decoded text. The rule for a token whose characters straddle two segments (BPE may merge a quote with a
letter, or a space with a word):

1. a token that overlaps the response span is `target`;
2. otherwise a token that overlaps one or more history titles is `history`, with the position of the
   title it shares the most characters with (the earlier title on a tie);
3. otherwise it is `instruction` (template words, quotes, separators, special tokens such as BOS).

The prompt and the response are tokenised together, as the model sees them. The response must begin on
a token boundary (no token may cover both the last prompt character and the first response character);
`check_response_boundary` verifies it for a tokenizer and raises a clear error if it does not hold,
because inference feeds the prompt alone and the trie continues from that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gdrt_core.errors import GdrtError
from gdrt_core.prompts import RESPONSE_HEADER, Rendered, quote

INSTRUCTION, HISTORY, TARGET = 0, 1, 2
ROLE_NAMES = {INSTRUCTION: "instruction", HISTORY: "history", TARGET: "target"}
IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]  # IGNORE_INDEX on every non-target token
    role: list[int]  # INSTRUCTION / HISTORY / TARGET per token
    history_pos: list[int]  # history position (0 = oldest) on history tokens, -1 elsewhere
    extra: dict = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        """Number of tokens before the first target token."""
        try:
            return self.role.index(TARGET)
        except ValueError:
            return len(self.role)

    def __len__(self) -> int:
        return len(self.input_ids)


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def assign_roles(
    offsets: list[tuple[int, int]], history_spans: tuple[tuple[int, int], ...], response_span: tuple[int, int]
) -> tuple[list[int], list[int]]:
    """Roles and history positions from token character offsets (the rule in the module docstring)."""
    roles, positions = [], []
    r0, r1 = response_span
    for s, e in offsets:
        if e > s and _overlap(s, e, r0, r1) > 0:
            roles.append(TARGET)
            positions.append(-1)
            continue
        best, best_pos = 0, -1
        if e > s:
            for i, (h0, h1) in enumerate(history_spans):
                if h0 >= e:
                    break
                ov = _overlap(s, e, h0, h1)
                if ov > best:
                    best, best_pos = ov, i
        if best_pos >= 0:
            roles.append(HISTORY)
            positions.append(best_pos)
        else:
            roles.append(INSTRUCTION)
            positions.append(-1)
    return roles, positions


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise GdrtError(
            f"tokenizer {type(tokenizer).__name__} has no offset mapping (a 'fast' tokenizer is required)",
            hint="load it with use_fast=True, or convert it with the `tokenizers` library",
        )
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def tokenize_example(tokenizer, rendered: Rendered, *, add_eos: bool = True) -> TokenizedExample:
    """Tokenise prompt + response together; labels are the response tokens (+ EOS), -100 elsewhere."""
    ids, offsets = _encode_with_offsets(tokenizer, rendered.text)
    # Tokenizers that append EOS themselves would duplicate it; drop trailing specials with empty span.
    while ids and offsets[-1] == (0, 0) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
        ids.pop()
        offsets.pop()
    roles, positions = assign_roles(offsets, rendered.history_spans, rendered.response_span)
    boundary = len(rendered.prompt)
    for (s, e), r in zip(offsets, roles, strict=True):
        if r == TARGET and s < boundary:
            raise GdrtError(
                f"the tokenizer merges the end of the prompt with the response (token at chars {s}-{e}); "
                "the response must start on a token boundary",
                hint=f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not supported as is",
            )
    if rendered.response and add_eos:
        if tokenizer.eos_token_id is None:
            raise GdrtError("the tokenizer has no EOS token", hint="set tokenizer.eos_token before training")
        ids.append(tokenizer.eos_token_id)
        roles.append(TARGET)
        positions.append(-1)
    labels = [t if r == TARGET else IGNORE_INDEX for t, r in zip(ids, roles, strict=True)]
    return TokenizedExample(
        input_ids=ids, attention_mask=[1] * len(ids), labels=labels, role=roles, history_pos=positions
    )


def tokenize_prompt(tokenizer, rendered: Rendered) -> TokenizedExample:
    """The prompt alone (inference input): same tokens as the prompt part of `tokenize_example`."""
    prompt_only = Rendered(prompt=rendered.prompt, response="", history_spans=rendered.history_spans)
    return tokenize_example(tokenizer, prompt_only, add_eos=False)


def response_token_ids(tokenizer, title: str) -> list[int]:
    """Token ids the model writes after the response header for `title` (quoted, + EOS).

    Tokenised together with the header, as in the prompt; the header's own tokens are dropped.
    This is the single source of the trie's paths.
    """
    header = RESPONSE_HEADER
    rendered = Rendered(prompt=header, response=quote(title), history_spans=())
    ex = tokenize_example(tokenizer, rendered)
    return [t for t, r in zip(ex.input_ids, ex.role, strict=True) if r == TARGET]


def check_response_boundary(tokenizer, titles: list[str] | None = None) -> None:
    """Raise a GdrtError if the tokenizer merges the response header with a response's first character."""
    for title in titles or ["A", "(x)", "\"quoted\"", "1 2 3", "élan"]:
        response_token_ids(tokenizer, title)
