"""Tokenising rendered examples with exact token roles (method.md §2).

The prompt and the response are tokenised together, as one text, exactly as the model sees them (the
canonical tokenisation of `Rendered.text`, plus EOS). Roles come from the character spans of
`prompts.render` and the tokenizer's offset mapping, never from decoded text.

Rule for a token's role (the order matters):

1. a special token the tokenizer adds itself (BOS, ...) is `instruction`; the EOS appended after the
   response is `target`;
2. characters that no token's span covers (whitespace a tokenizer trimmed from its offsets, as GPT-2's
   ByteLevel(trim_offsets=True) does: ` word` -> `word`, a lone space -> an empty span) belong to the next
   token, whose span is widened back over them;
3. a token that overlaps the response span is `target`;
4. otherwise a token that overlaps one or more history titles is `history`, with the position of the title
   it shares the most characters with (the earlier title on a tie);
5. otherwise it is `instruction` (template words, quotes, separators).

So a token that straddles a title and the template around it (BPE merges `)",` or ` "(`; SentencePiece
`.",`) belongs to the title: every character of title i is carried by tokens tagged with position i, and
ablating position i removes all of it. What that means for decoding: the tokens of position i decode to the
title itself, extended on the left by a suffix of the separator before it (`before: "` / `", "`) and on the
right by a prefix of the separator after it (`", "` / `"\n\n### Response:\n`) exactly when a token straddles
that boundary; with no straddling token they decode to the title alone. Separators contain a space, and
these tokenizers never merge across one inside a separator, so a token never joins two titles (rule 4's
tie-break only matters for tokenizers that would).

The response must begin on a token boundary: no token may cover both the last prompt character and the
first response character, because inference feeds the prompt alone and the trie continues from that
boundary. `tokenize_example` raises if the boundary is crossed; `check_response_boundary` also verifies
that the prompt alone tokenises to the same ids as the prompt inside a full example, and that
`response_token_ids` (the trie's paths) equals the target tokens of a full example. Call it once when a
tokenizer is loaded.

Text is always text: special-token strings inside titles (`</s>`, `<|endoftext|>`) are tokenised as
ordinary characters (`split_special_tokens`), so catalogue data cannot inject an EOS; a tokenizer that can
only read such text as its special token (a converted unigram model keeps `</s>` in its vocabulary) is
refused with the offending text named.

Context length: a model reads at most `context_limit(model, tokenizer)` tokens (learned positions run out,
RoPE models run past what they were trained for). Every stage passes that limit to `tokenize_example` /
`tokenize_prompt` (`max_length`, and for inference `reserve`: the longest response the trie can generate),
which refuse a longer example with a GdrtError naming it, its length and the limit. Nothing is truncated:
dropping history titles would change the prompt the method's groups and attributions are computed on.

Decoding is not part of the contract (roles never depend on it), but note that SentencePiece's decoder
drops one leading space of the decoded text: a title that itself starts with a space decodes without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gdrt_core.errors import GdrtError
from gdrt_core.prompts import RESPONSE_HEADER, Rendered, quote, render

INSTRUCTION, HISTORY, TARGET = 0, 1, 2
ROLE_NAMES = {INSTRUCTION: "instruction", HISTORY: "history", TARGET: "target"}
IGNORE_INDEX = -100

Span = tuple[int, int]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]  # IGNORE_INDEX on every non-target token
    role: list[int]  # INSTRUCTION / HISTORY / TARGET per token
    history_pos: list[int]  # history position (0 = oldest) on history tokens, -1 elsewhere
    extra: dict = field(default_factory=dict)
    # character span of each token in `Rendered.text` after rule 2 of the module docstring; special tokens
    # and the appended EOS have an empty span
    offsets: list[Span] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        """Number of tokens before the first target token."""
        try:
            return self.role.index(TARGET)
        except ValueError:
            return len(self.role)

    def indices(self, role: int, position: int | None = None) -> list[int]:
        """Token indices with `role` (and, for history, the given history position)."""
        return [
            i for i, (r, p) in enumerate(zip(self.role, self.history_pos, strict=True))
            if r == role and (position is None or p == position)
        ]

    def __len__(self) -> int:
        return len(self.input_ids)


def untrim_spans(offsets: list[Span], special: list[bool] | None = None) -> list[Span]:
    """Rule 2: the characters before a token that no token covers belong to that token.

    Tokenizers that trim offsets (GPT-2's ByteLevel(trim_offsets=True)) drop the leading space of `Ġword`
    and collapse a whitespace-only token to an empty span at its end; widening each non-special token's
    span back to where the previous one ended restores the characters it stands for. Untrimmed offsets
    (Llama 3, SentencePiece) have no gaps and come back unchanged; special tokens keep their empty span.
    """
    special = special or [False] * len(offsets)
    widened: list[Span] = []
    covered_to = 0
    for (s, e), is_special in zip(offsets, special, strict=True):
        if is_special:
            widened.append((s, e))
            continue
        if covered_to < s:
            s = covered_to
        widened.append((s, e) if e >= s else (s, s))
        if e > covered_to:
            covered_to = e
    return widened


def assign_roles(
    offsets: list[Span], history_spans: tuple[Span, ...], response_span: Span
) -> tuple[list[int], list[int]]:
    """Roles and history positions from token character spans (rules 3-5 of the module docstring).

    Empty spans (special tokens) are instruction; restore trimmed spans with `untrim_spans` first.
    """
    roles, positions = [], []
    r0, r1 = response_span
    first = 0  # first title that ends after the current token starts (a sweep: tokens come in order)
    last_start = 0
    for s, e in offsets:
        if e <= s:
            roles.append(INSTRUCTION)
            positions.append(-1)
            continue
        if s < r1 and e > r0:
            roles.append(TARGET)
            positions.append(-1)
            continue
        if s < last_start:  # offsets went backwards (unusual tokenizer): restart the sweep
            first = 0
        last_start = s
        while first < len(history_spans) and history_spans[first][1] <= s:
            first += 1
        best, best_pos = 0, -1
        i = first
        while i < len(history_spans) and history_spans[i][0] < e:
            h0, h1 = history_spans[i]
            shared = (e if e < h1 else h1) - (s if s > h0 else h0)
            if shared > best:
                best, best_pos = shared, i
            i += 1
        if best_pos >= 0:
            roles.append(HISTORY)
            positions.append(best_pos)
        else:
            roles.append(INSTRUCTION)
            positions.append(-1)
    return roles, positions


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[Span], list[bool]]:
    """Ids, character spans and the added-special-token flags of `text` (BOS etc. added as configured)."""
    if not getattr(tokenizer, "is_fast", False):
        raise GdrtError(
            f"tokenizer {type(tokenizer).__name__} has no offset mapping (a 'fast' tokenizer is required)",
            hint="load it with use_fast=True, or convert it with the `tokenizers` library",
        )
    enc = tokenizer(
        text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
        split_special_tokens=True,
    )
    ids = list(enc["input_ids"])
    offsets = [tuple(span) for span in enc["offset_mapping"]]
    special = [bool(m) for m in enc.get("special_tokens_mask", [0] * len(ids))]
    return ids, offsets, special


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return repr(tokenizer.convert_ids_to_tokens(int(token_id)))
    except Exception:  # a broken vocabulary must not hide the real error
        return str(token_id)


def _refuse_special_tokens_read_from_text(
    tokenizer, text: str, ids: list[int], offsets: list[Span], special: list[bool]
) -> None:
    """Some tokenizers (converted unigram models) read `</s>` in text as EOS despite split_special_tokens."""
    reserved = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None}
    for k, (token_id, (s, e), is_special) in enumerate(zip(ids, offsets, special, strict=True)):
        if token_id in reserved and not is_special and e > s:
            raise GdrtError(
                f"the text {text[s:e]!r} at characters {s}-{e} (token {k}) is one that tokenizer "
                f"{_tokenizer_name(tokenizer)} can only read as its special token {_token_text(tokenizer, token_id)}: "
                f"...{text[max(0, s - 40):e + 40]!r}...",
                hint="remove special-token text from item titles when curating the dataset",
            )


# tokenizer.model_max_length when the tokenizer does not know its model's limit (transformers' sentinel, 1e30)
_NO_TOKENIZER_LIMIT = 10**18
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_limit(model=None, tokenizer=None) -> int | None:
    """How many tokens the model may read: the smaller of its config's position limit
    (`max_position_embeddings`, GPT-2's `n_positions`, ...) and the tokenizer's `model_max_length` when the
    tokenizer states one; None when neither does."""
    limits = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
            break
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < _NO_TOKENIZER_LIMIT:
        limits.append(stated)
    return min(limits) if limits else None


def check_length(length: int, max_length: int | None, name: str, *, reserve: int = 0) -> None:
    """Raise a GdrtError when `length` tokens (+ `reserve` to be generated) exceed `max_length`."""
    if max_length is None or length + reserve <= max_length:
        return
    what = f"{length} tokens" if not reserve else (
        f"{length} prompt tokens + up to {reserve} generated (the longest catalogue title) = {length + reserve}"
    )
    raise GdrtError(
        f"{name} is longer than the model's context: {what} > {max_length} tokens",
        hint="curate the dataset with a smaller max_history (or shorter titles), or use a model with a longer "
        "context; examples are never truncated (docs/method.md, Context length)",
    )


def tokenize_example(
    tokenizer, rendered: Rendered, *, add_eos: bool = True, max_length: int | None = None,
    name: str = "the example", reserve: int = 0,
) -> TokenizedExample:
    """Tokenise prompt + response together; labels are the response tokens (+ EOS), -100 elsewhere.

    With `max_length` (`context_limit`), an example longer than it (plus `reserve` tokens the model will
    generate after it) is refused, naming it as `name`.
    """
    ids, offsets, special = _encode_with_offsets(tokenizer, rendered.text)
    # Tokenizers that append EOS themselves would duplicate it: drop trailing added EOS tokens.
    while len(ids) > 1 and special[-1] and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
        offsets.pop()
        special.pop()
    _refuse_special_tokens_read_from_text(tokenizer, rendered.text, ids, offsets, special)
    offsets = untrim_spans(offsets, special)
    roles, positions = assign_roles(offsets, rendered.history_spans, rendered.response_span)
    boundary = len(rendered.prompt)
    for k, ((s, e), r) in enumerate(zip(offsets, roles, strict=True)):
        if r == TARGET and s < boundary:
            text = rendered.text
            raise GdrtError(
                f"tokenizer {_tokenizer_name(tokenizer)} merges the end of the prompt with the start of the "
                f"response: token {k} ({_token_text(tokenizer, ids[k])}) covers characters {s}-{e}, across the "
                f"prompt/response boundary at {boundary} ({text[max(0, s - 10):boundary]!r} | "
                f"{text[boundary:e + 10]!r}). The response must start on a token boundary, because "
                "inference feeds the prompt alone and constrained decoding continues from there",
                hint="use a tokenizer whose pre-tokenizer splits at the newline before the response: byte-level "
                "BPE with the GPT-2 or Llama-3 split pattern, or SentencePiece trained on lines",
            )
    if rendered.response and add_eos:
        if tokenizer.eos_token_id is None:
            raise GdrtError(
                f"tokenizer {_tokenizer_name(tokenizer)} has no EOS token; the response must end with one",
                hint="set tokenizer.eos_token to the model's end-of-sequence token",
            )
        ids.append(tokenizer.eos_token_id)
        roles.append(TARGET)
        positions.append(-1)
        offsets.append((len(rendered.text), len(rendered.text)))
    check_length(len(ids), max_length, name, reserve=reserve)
    labels = [t if r == TARGET else IGNORE_INDEX for t, r in zip(ids, roles, strict=True)]
    return TokenizedExample(
        input_ids=ids, attention_mask=[1] * len(ids), labels=labels, role=roles, history_pos=positions,
        offsets=offsets,
    )


def tokenize_prompt(
    tokenizer, rendered: Rendered, *, max_length: int | None = None, reserve: int = 0, name: str = "the prompt"
) -> TokenizedExample:
    """The prompt alone (inference input): same tokens as the prompt part of `tokenize_example`.

    `reserve`: tokens the model will generate after it (the trie's longest path), counted against `max_length`.
    """
    prompt_only = Rendered(prompt=rendered.prompt, response="", history_spans=rendered.history_spans)
    return tokenize_example(tokenizer, prompt_only, add_eos=False, max_length=max_length, name=name, reserve=reserve)


def response_token_ids(tokenizer, title: str) -> list[int]:
    """Token ids the model writes after the response header for `title` (quoted, + EOS).

    Tokenised together with the header, as in the prompt; the header's own tokens are dropped.
    This is the single source of the trie's paths.
    """
    rendered = Rendered(prompt=RESPONSE_HEADER, response=quote(title), history_spans=())
    ex = tokenize_example(tokenizer, rendered)
    return [t for t, r in zip(ex.input_ids, ex.role, strict=True) if r == TARGET]


BOUNDARY_PROBE_TITLES = ("A", "(x)", '"quoted"', "1 2 3", "élan", " leading space", "x\ny", "Ünïcödé ½")


def check_response_boundary(tokenizer, titles: list[str] | None = None, domain: str = "generic") -> None:
    """Raise a GdrtError unless `tokenizer` keeps the prompt and the response apart (module docstring).

    For each probe title (used as history and as target): the response starts on a token boundary, the
    prompt alone tokenises to the prompt part of the full example, and `response_token_ids` equals the
    example's target tokens.
    """
    name = _tokenizer_name(tokenizer)
    for title in titles or BOUNDARY_PROBE_TITLES:
        rendered = render(domain, [title], title)
        example = tokenize_example(tokenizer, rendered)
        prompt = tokenize_prompt(tokenizer, rendered)
        if prompt.input_ids != example.input_ids[: example.prompt_len]:
            raise GdrtError(
                f"tokenizer {name} tokenises the prompt alone differently from the prompt inside a training "
                f"example (title {title!r}): {len(prompt.input_ids)} vs {example.prompt_len} tokens; inference "
                "would feed the model a prompt it never saw in training",
                hint="use a tokenizer without a normalizer that strips or rewrites the end of the text",
            )
        target = [t for t, r in zip(example.input_ids, example.role, strict=True) if r == TARGET]
        if response_token_ids(tokenizer, title) != target:
            raise GdrtError(
                f"tokenizer {name} tokenises the response {quote(title)!r} differently after the header alone "
                "than inside a full example; the decoding trie would not match the training targets",
                hint="use a tokenizer whose pre-tokenizer splits at the newline before the response",
            )
