"""Token roles on real Office titles, for byte-level BPE and SentencePiece tokenizers built here.

Every tokenizer is trained in the test (no download): GPT-2-style byte-level BPE (trimmed offsets, as
GPT-2 ships), Llama-3-style byte-level BPE (its split pattern, untrimmed offsets), and SentencePiece BPE
and unigram models trained with the `sentencepiece` package and wrapped as fast tokenizers. They are
trained on rendered prompts so that they learn the merges that straddle titles and template (`)",`).
"""

from __future__ import annotations

import html
import json
import random
from pathlib import Path

import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.prompts import quote, render
from gdrt_core.tokenization import (
    HISTORY,
    IGNORE_INDEX,
    INSTRUCTION,
    TARGET,
    assign_roles,
    check_response_boundary,
    response_token_ids,
    tokenize_example,
    tokenize_prompt,
    untrim_spans,
)

OFFICE_TITLES = Path(__file__).resolve().parents[2] / "data" / "office" / "id2name4Rec.json"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KINDS = ("bpe-gpt2", "bpe-llama3", "spm-bpe", "spm-unigram")


# ---------------------------------------------------------------- titles


@pytest.fixture(scope="module")
def catalogue() -> list[str]:
    return list(json.loads(OFFICE_TITLES.read_text(encoding="utf-8")).values())


def _first(titles: list[str], predicate) -> str:
    return next(t for t in titles if predicate(t))


@pytest.fixture(scope="module")
def hard_titles(catalogue) -> dict[str, str]:
    """Titles picked by scanning the Office file, plus what the file lacks.

    The file writes quotes and non-ASCII as HTML entities (`&quot;`, `&frac12;`, `&reg;`) and has no raw
    `"` or non-ASCII character, so the entity titles also appear unescaped (as a curation that decodes
    entities would store them), and two written-out titles add emoji/CJK and a title that is only quotes.
    """
    t = catalogue
    picked = {
        "amp": _first(t, lambda s: "&amp;" in s),
        "quot_entity": _first(t, lambda s: "&quot;" in s),
        "apostrophe": _first(t, lambda s: "'" in s and "&" not in s),
        "longest": max(t, key=len),
        "newline": _first(t, lambda s: "\n" in s),
        "double_space": _first(t, lambda s: "  " in s),
        "ends_with_period": _first(t, lambda s: s.endswith(".")),
        "ends_with_paren": _first(t, lambda s: s.endswith(")")),
        "starts_with_paren": _first(t, lambda s: s.startswith("(")),
        "starts_with_digit": _first(t, lambda s: s[0].isdigit()),
        "shortest": min(t, key=len),
        "unescaped_quotes": html.unescape(_first(t, lambda s: "&quot;" in s and "&frac" in s)),
        "unescaped_reg": html.unescape(_first(t, lambda s: "&reg;" in s)),
        "unescaped_mojibake": html.unescape(_first(t, lambda s: "&Acirc;" in s)),
        "emoji_cjk": "Café Crème — “Notebook” 日本語 😀 ½",
        "only_quotes": '"""',
    }
    assert len(picked["longest"]) > 300
    assert '"' in picked["unescaped_quotes"] and any(ord(c) > 127 for c in picked["unescaped_reg"])
    return picked


# ---------------------------------------------------------------- tokenizers built here


def _training_texts(catalogue: list[str]) -> list[str]:
    rng = random.Random(0)
    texts = []
    for _ in range(600):
        window = rng.sample(catalogue, 6)
        texts.append(render("office", window[:-1], window[-1]).text)
    return texts


def _byte_level_bpe(texts: list[str], style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trim = True  # as GPT-2's tokenizer.json: whitespace tokens get empty spans
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trim = False
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"], show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=trim),
        processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        name_or_path=f"test-bpe-{style}",
    )


def _sentencepiece(texts: list[str], model_type: str, tmp: Path):
    """Train a SentencePiece model on prompt lines and wrap it as a fast tokenizer (no protobuf needed).

    Trained line by line, as SentencePiece models are, so the newline is never part of a piece (it falls
    back to the byte <0x0A>, as in Llama 2).
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    lines = [line for text in texts for line in text.split("\n") if line]
    lines.append("<s> </s> <unk>")  # the characters of the control symbols, so text can spell them
    prefix = str(tmp / f"spm-{model_type}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=1000, model_type=model_type,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if model_type == "bpe":
        # Llama's own fast tokenizer: BPE with byte fallback, Metaspace, merges ordered by piece rank.
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = []
        for i, piece in enumerate(pieces):
            if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
                continue
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
        return sp, LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, name_or_path="test-spm-bpe")
    model = models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=0, byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", name_or_path="test-spm-unigram"
    )
    return sp, wrapped


@pytest.fixture(scope="module")
def built(catalogue, tmp_path_factory) -> dict:
    texts = _training_texts(catalogue)
    tmp = tmp_path_factory.mktemp("spm")
    out = {"texts": texts}
    out["bpe-gpt2"] = _byte_level_bpe(texts, "gpt2")
    out["bpe-llama3"] = _byte_level_bpe(texts, "llama3")
    out["spm-bpe-raw"], out["spm-bpe"] = _sentencepiece(texts, "bpe", tmp)
    out["spm-unigram-raw"], out["spm-unigram"] = _sentencepiece(texts, "unigram", tmp)
    return out


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request, built):
    return built[request.param]


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _windows(hard_titles: dict[str, str]) -> list[tuple[list[str], str]]:
    """Windows that put every hard title at a history position and as the target."""
    titles = list(hard_titles.values())
    out = []
    for k in range(0, len(titles), 5):
        history = titles[k:k + 5]
        target = titles[(k + 5) % len(titles)]
        out.append((history, target))
    out += [([t], t) for t in titles]  # each title alone: first and last history position at once
    return out


# ---------------------------------------------------------------- the wrappers are faithful


@pytest.mark.parametrize("kind", ["spm-bpe", "spm-unigram"])
def test_sentencepiece_wrapper_gives_sentencepiece_ids(built, hard_titles, kind):
    """The wrapped fast tokenizer segments exactly as the sentencepiece model (so the test tests SPM)."""
    sp, tok = built[kind + "-raw"], built[kind]
    for history, target in _windows(hard_titles)[:4]:
        text = render("office", history, target).text
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    if kind == "spm-bpe":  # control symbols in text are text (the unigram wrapper cannot: see below)
        text = "Pen </s> Set <s>"
        assert tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == sp.encode(text)


# ---------------------------------------------------------------- roles on real titles


def test_target_tokens_decode_to_quoted_title_and_eos(tokenizer, hard_titles):
    for history, target in _windows(hard_titles):
        ex = tokenize_example(tokenizer, render("office", history, target))
        target_ids = [ex.input_ids[i] for i in ex.indices(TARGET)]
        assert _decode(tokenizer, target_ids) == quote(target) + tokenizer.eos_token
        assert target_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in target_ids[:-1]
        # the trie's path for the title is exactly what training teaches
        assert response_token_ids(tokenizer, target) == target_ids
        # targets are one contiguous run at the end
        assert ex.indices(TARGET) == list(range(ex.prompt_len, len(ex)))


def _separator_before(rendered, pos: int) -> str:
    return rendered.prompt[: rendered.history_spans[pos][0]] if pos == 0 else '", "'


def _separator_after(rendered, pos: int) -> str:
    if pos + 1 < len(rendered.history_spans):
        return '", "'
    return rendered.prompt[rendered.history_spans[pos][1]:]


def test_history_tokens_decode_to_their_title(tokenizer, hard_titles):
    """decode(tokens of position i) == left + title + right (the straddling rule, module docstring).

    left is a suffix of the separator before the title and is non-empty exactly when the first token of
    position i starts before the title; right is a prefix of the separator after it and non-empty exactly
    when the last token ends after the title. With no straddling token, the decode is the title itself.
    """
    exact = straddled = 0
    for history, target in _windows(hard_titles):
        rendered = render("office", history, target)
        ex = tokenize_example(tokenizer, rendered)
        for pos, title in enumerate(history):
            idx = ex.indices(HISTORY, pos)
            assert idx == list(range(idx[0], idx[-1] + 1)), "a title's tokens are contiguous"
            decoded = _decode(tokenizer, [ex.input_ids[i] for i in idx])
            h0, h1 = rendered.history_spans[pos]
            starts_before = ex.offsets[idx[0]][0] < h0
            ends_after = ex.offsets[idx[-1]][1] > h1
            at = decoded.find(title)
            assert at >= 0, (title, decoded)
            left, right = decoded[:at], decoded[at + len(title):]
            assert _separator_before(rendered, pos).endswith(left)
            assert _separator_after(rendered, pos).startswith(right)
            assert bool(left) == starts_before and bool(right) == ends_after, (title, decoded)
            if left or right:
                straddled += 1
            else:
                exact += 1
                assert decoded == title
    assert exact > 0 and straddled > 0, "both cases of the rule must be exercised"


def test_every_title_character_is_carried_by_its_position(tokenizer, hard_titles):
    """Offsets (after filling trimmed spans) put each title character only in tokens of its position."""
    for history, target in _windows(hard_titles):
        rendered = render("office", history, target)
        ex = tokenize_example(tokenizer, rendered)
        for pos, (h0, h1) in enumerate(rendered.history_spans):
            carriers = {ex.history_pos[k] for k, (s, e) in enumerate(ex.offsets) if s < h1 and e > h0}
            assert carriers == {pos}
            covered = set()
            for k in ex.indices(HISTORY, pos):
                covered.update(range(*ex.offsets[k]))
            assert set(range(h0, h1)) <= covered


def test_labels_are_ignored_exactly_on_non_target_tokens(tokenizer, hard_titles):
    for history, target in _windows(hard_titles):
        ex = tokenize_example(tokenizer, render("office", history, target))
        for tid, label, role in zip(ex.input_ids, ex.labels, ex.role, strict=True):
            assert (label == IGNORE_INDEX) == (role != TARGET)
            if role == TARGET:
                assert label == tid
        assert ex.attention_mask == [1] * len(ex)
        assert all((r == HISTORY) == (p >= 0) for r, p in zip(ex.role, ex.history_pos, strict=True))


def test_roles_in_template_order(tokenizer, hard_titles):
    """instruction, then history positions 0..n-1 (interleaved with separators), then the target run."""
    for history, target in _windows(hard_titles):
        ex = tokenize_example(tokenizer, render("office", history, target))
        assert ex.role[0] == INSTRUCTION and ex.role[ex.prompt_len - 1] == INSTRUCTION
        positions = [p for p in ex.history_pos if p >= 0]
        assert positions == sorted(positions) and set(positions) == set(range(len(history)))
        if tokenizer.bos_token_id is not None:
            assert ex.input_ids[0] == tokenizer.bos_token_id and ex.offsets[0] == (0, 0)


def test_prompt_alone_is_the_prompt_part_of_the_example(tokenizer, hard_titles):
    for history, target in _windows(hard_titles):
        rendered = render("office", history, target)
        ex = tokenize_example(tokenizer, rendered)
        prompt = tokenize_prompt(tokenizer, rendered)
        assert prompt.input_ids == ex.input_ids[: ex.prompt_len]
        assert prompt.role == ex.role[: ex.prompt_len] and prompt.history_pos == ex.history_pos[: ex.prompt_len]
        assert TARGET not in prompt.role and set(prompt.labels) == {IGNORE_INDEX}


def test_empty_history_has_no_history_tokens(tokenizer, hard_titles):
    """The grouping stage's `drop` mode renders an empty history list."""
    target = hard_titles["amp"]
    ex = tokenize_example(tokenizer, render("office", [], target))
    assert HISTORY not in ex.role
    assert _decode(tokenizer, [ex.input_ids[i] for i in ex.indices(TARGET)]) == quote(target) + tokenizer.eos_token


def test_special_token_text_in_a_title_stays_text_or_is_refused(tokenizer):
    """Titles are text: `</s>` in a title is spelled with ordinary tokens, never read as EOS.

    A unigram model converted to a fast tokenizer keeps its control pieces in the Viterbi vocabulary and
    reads the text `</s>` as EOS whatever `split_special_tokens` says; such an example is refused.
    """
    title = f"Pen {tokenizer.eos_token} Set"
    if tokenizer.name_or_path == "test-spm-unigram":
        with pytest.raises(GdrtError, match="can only read as its special token"):
            tokenize_example(tokenizer, render("office", [title], title))
        return
    ex = tokenize_example(tokenizer, render("office", [title], title))
    assert ex.input_ids.count(tokenizer.eos_token_id) == 1 and ex.input_ids[-1] == tokenizer.eos_token_id
    assert _decode(tokenizer, [ex.input_ids[i] for i in ex.indices(HISTORY, 0)]) == title


def test_trimmed_whitespace_tokens_keep_their_role(built):
    """GPT-2's trimmed offsets give whitespace tokens an empty span: they must still be title/target.

    In "Colors  (05510)" the first of the two spaces is its own token `Ġ` with span (p, p); without
    rule 2 it would be `instruction`, and inside the response it would be masked out of the loss.
    """
    tok = built["bpe-gpt2"]
    title = "Assorted Colors  (05510)"
    ex = tokenize_example(tok, render("office", [title], title))
    space = tok.convert_tokens_to_ids("Ġ")
    lone = [i for i, t in enumerate(ex.input_ids) if t == space]
    assert len(lone) == 2  # one in the history title, one in the response
    assert [ex.role[i] for i in lone] == [HISTORY, TARGET]
    assert all(ex.offsets[i][1] - ex.offsets[i][0] == 1 for i in lone)
    assert ex.labels[lone[1]] == space


def test_real_office_windows(tokenizer):
    """The first 60 training windows of data/office (10-item histories) keep every invariant."""
    import ast
    import csv

    titles = json.loads(OFFICE_TITLES.read_text(encoding="utf-8"))
    with open(OFFICE_TITLES.parent / "train.csv", newline="", encoding="utf-8") as f:
        rows = [ast.literal_eval(r["item_ids"]) for _, r in zip(range(60), csv.DictReader(f), strict=False)]
    for item_ids in rows:
        history, target = [titles[str(i)] for i in item_ids[:-1]], titles[str(item_ids[-1])]
        rendered = render("office", history, target)
        ex = tokenize_example(tokenizer, rendered)
        assert _decode(tokenizer, [ex.input_ids[i] for i in ex.indices(TARGET)]) == quote(target) + tokenizer.eos_token
        assert tokenize_prompt(tokenizer, rendered).input_ids == ex.input_ids[: ex.prompt_len]
        for pos, (h0, h1) in enumerate(rendered.history_spans):
            assert {ex.history_pos[k] for k, (s, e) in enumerate(ex.offsets) if s < h1 and e > h0} == {pos}
            assert history[pos] in _decode(tokenizer, [ex.input_ids[i] for i in ex.indices(HISTORY, pos)])
        assert [label != IGNORE_INDEX for label in ex.labels] == [r == TARGET for r in ex.role]


# ---------------------------------------------------------------- the rule on hand-made offsets


def test_assign_roles_rule_by_hand():
    """Text positions (history titles at [10, 15) and [19, 24), response at [30, 37)):

    token (8, 11) straddles a quote and the first title's first char -> history 0 (1 char shared);
    token (14, 17) straddles the first title's end and `",` -> history 0;
    token (13, 21) shares 2 chars with title 0 ([13, 15)) and 2 with title 1 ([19, 21)) -> tie -> history 0;
    token (14, 22) shares 1 with title 0 and 3 with title 1 -> history 1;
    token (17, 19) touches no title character -> instruction;
    token (28, 31) overlaps the response -> target; an empty span -> instruction.
    """
    offsets = [(0, 0), (8, 11), (14, 17), (13, 21), (14, 22), (17, 19), (28, 31), (31, 37)]
    roles, positions = assign_roles(offsets, ((10, 15), (19, 24)), (30, 37))
    assert roles == [INSTRUCTION, HISTORY, HISTORY, HISTORY, HISTORY, INSTRUCTION, TARGET, TARGET]
    assert positions == [-1, 0, 0, 0, 1, -1, -1, -1]


def test_untrim_spans_gives_gaps_to_the_next_token():
    """Text "ab  cd ef" (chars: a0 b1 _2 _3 c4 d5 _6 e7 f8), GPT-2 tokens BOS, `ab`, `Ġ`, `Ġcd`, `Ġef`.

    Trimmed offsets: BOS (0,0); `ab` (0,2); the lone space at 2 collapses to its end (3,3); `Ġcd` covers
    3-5 but is trimmed to (4,6); `Ġef` covers 6-8, trimmed to (7,9). Widening each span back to where the
    previous one ended: (2,3), (3,6), (6,9); BOS keeps (0,0). Untrimmed offsets come back unchanged.
    """
    offsets = [(0, 0), (0, 2), (3, 3), (4, 6), (7, 9)]
    special = [True, False, False, False, False]
    assert untrim_spans(offsets, special) == [(0, 0), (0, 2), (2, 3), (3, 6), (6, 9)]
    untrimmed = [(0, 2), (2, 3), (3, 6), (6, 9)]
    assert untrim_spans(untrimmed) == untrimmed


# ---------------------------------------------------------------- the response boundary


def test_check_response_boundary_accepts_the_built_tokenizers(tokenizer, hard_titles):
    check_response_boundary(tokenizer)
    check_response_boundary(tokenizer, list(hard_titles.values()), domain="office")


def _merging_tokenizer():
    """A byte-level BPE with no split pattern and one merge: newline + quote -> one token `Ċ"`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|eos|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    vocab['Ċ"'] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", '"')]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", name_or_path="merges-newline-quote")


def test_check_response_boundary_rejects_a_merging_tokenizer():
    tok = _merging_tokenizer()
    with pytest.raises(GdrtError) as err:
        check_response_boundary(tok)
    message = str(err.value)
    assert "merges-newline-quote" in message and "token boundary" in message and "'Ċ\"'" in message
    assert "Response:\\n' | '\"A\"'" in message  # shows the text on both sides of the boundary
    with pytest.raises(GdrtError, match="token boundary"):
        response_token_ids(tok, "Pen")


def test_check_response_boundary_rejects_a_tokenizer_that_strips_the_prompt(built):
    """A normalizer that strips trailing whitespace drops the prompt's final newline when it is alone."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer.from_str(built["bpe-llama3"].backend_tokenizer.to_str())
    inner.normalizer = normalizers.Strip(left=False, right=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|bos|>", eos_token="<|eos|>",
                                  name_or_path="strips-trailing")
    with pytest.raises(GdrtError, match="strips-trailing tokenises the prompt alone differently"):
        check_response_boundary(tok)


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(GdrtError, match="fast"):
        tokenize_example(Slow(), render("office", ["a"], "b"))


def test_missing_eos_is_refused(built):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=built["bpe-gpt2"].backend_tokenizer, name_or_path="no-eos")
    with pytest.raises(GdrtError, match="no EOS"):
        tokenize_example(tok, render("office", ["a"], "b"))


# ---------------------------------------------------------------- random titles


_TITLE_ALPHABET = 'ab Z09 ",.()&;\'-/\n\té日😀½'


@pytest.mark.parametrize("kind", ["bpe-gpt2", "bpe-llama3", "spm-bpe"])
def test_random_titles_keep_every_invariant(built, kind):
    """Random titles over quotes, separators, whitespace and multi-byte characters (hypothesis).

    Offsets: every title character is carried by its position only, targets are exactly the response.
    Decoding: titles without surrounding whitespace decode as the rule says (SentencePiece's decoder drops
    a leading space of the decoded text, so a title that starts with one cannot decode to itself).
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tok = built[kind]
    titles = st.text(alphabet=_TITLE_ALPHABET, min_size=1, max_size=30).filter(lambda s: s.strip() == s != "")

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(history=st.lists(titles, min_size=1, max_size=3), target=titles)
    def check(history, target):
        rendered = render("office", history, target)
        ex = tokenize_example(tok, rendered)
        target_ids = [ex.input_ids[i] for i in ex.indices(TARGET)]
        assert _decode(tok, target_ids) == quote(target) + tok.eos_token
        assert response_token_ids(tok, target) == target_ids
        assert tokenize_prompt(tok, rendered).input_ids == ex.input_ids[: ex.prompt_len]
        for pos, (h0, h1) in enumerate(rendered.history_spans):
            carriers = {ex.history_pos[k] for k, (s, e) in enumerate(ex.offsets) if s < h1 and e > h0}
            assert carriers == {pos}
            idx = ex.indices(HISTORY, pos)
            decoded = _decode(tok, [ex.input_ids[i] for i in idx])
            at = decoded.find(history[pos])
            assert at >= 0, (history[pos], decoded)
            assert _separator_before(rendered, pos).endswith(decoded[:at])
            assert _separator_after(rendered, pos).startswith(decoded[at + len(history[pos]):])

    check()
