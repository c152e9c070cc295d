"""Constrained beam search: exact against transformers' `generate` with a dict trie (the oracle).

The oracle is the straightforward reference: `model.generate(num_beams=10, num_return_sequences=10,
prefix_allowed_tokens_fn=<dict: generated prefix -> allowed next tokens>)`, one example at a time, with
the same length_penalty / early_stopping / renormalisation and max_new_tokens = the trie's depth. Its
placeholder hypotheses (score <= -1e9, produced when fewer than num_beams real candidates exist) are not
recommendations and are dropped before comparing.
"""

from __future__ import annotations

import math

import pytest
import torch

from gdrt_core.generation import (
    BeamSearchSettings,
    _segment_log_softmax,
    constrained_beam_search,
    rank_prompts,
)
from gdrt_core.prompts import render
from gdrt_core.tokenization import IGNORE_INDEX, response_token_ids, tokenize_example, tokenize_prompt
from gdrt_core.trie import build_trie

PLACEHOLDER_SCORE = -1e6  # generate's filler hypotheses start at -1e9 (divided by length ** length_penalty)


# --------------------------------------------------------------------------------------------- the oracle


def dict_trie(tokenizer, titles) -> dict[tuple[int, ...], list[int]]:
    """{generated prefix: allowed next tokens} over the response paths of `titles`."""
    allowed: dict[tuple[int, ...], set[int]] = {}
    for title in set(titles):
        path = response_token_ids(tokenizer, title)
        for j in range(len(path)):
            allowed.setdefault(tuple(path[:j]), set()).add(path[j])
    return {k: sorted(v) for k, v in allowed.items()}


def hf_reference(model, tokenizer, trie, prompts, settings: BeamSearchSettings, allowed=None):
    """[(title, score), ...] per prompt from transformers' beam search with prefix_allowed_tokens_fn."""
    allowed = allowed if allowed is not None else dict_trie(tokenizer, trie.titles)
    eos = tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        start = len(prompt)

        def allowed_fn(batch_id, sequence, start=start):
            # a prefix off the trie only exists in generate's -1e9 filler beams: let it end
            return allowed.get(tuple(sequence[start:].tolist()), [eos])

        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), num_beams=settings.num_beams,
                num_return_sequences=settings.num_return_sequences, max_new_tokens=trie.max_depth,
                prefix_allowed_tokens_fn=allowed_fn, length_penalty=settings.length_penalty,
                early_stopping=settings.early_stopping, renormalize_logits=settings.renormalize, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, return_dict_in_generate=True,
                output_scores=True,
            )
        ranking = []
        for sequence, score in zip(gen.sequences, gen.sequences_scores, strict=True):
            if score <= PLACEHOLDER_SCORE:
                continue
            tokens = sequence[start:].tolist()
            tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
            ranking.append((trie.title_of(tokens), float(score)))
        out.append(ranking)
    return out


# -------------------------------------------------------------------------------------------- fixtures


def quick_sft(model, tokenizer, examples, *, steps: int, batch_size: int = 8, lr: float = 3e-3, seed: int = 0):
    """A few AdamW steps of response-only cross-entropy: peaked, history-dependent distributions."""
    gen = torch.Generator().manual_seed(seed)
    tokenized = [tokenize_example(tokenizer, render("office", list(e.history_titles), e.target_title)) for e in examples]
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = [tokenized[i] for i in torch.randint(len(tokenized), (batch_size,), generator=gen).tolist()]
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            input_ids[i, : len(x)] = torch.tensor(x.input_ids)
            labels[i, : len(x)] = torch.tensor(x.labels)
            mask[i, : len(x)] = 1
        device = model.device
        loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster than two on a shared machine (no cross-thread sync per op)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def office(office_dataset):
    from gdrt_core.dataset import Dataset

    return Dataset(office_dataset)


@pytest.fixture(scope="module")
def tokenizer(office):
    from gdrt_core.embedded import tokenizer_corpus, train_tokenizer

    examples = [(list(e.history_titles), e.target_title) for e in office.examples("train", limit=4)]
    return train_tokenizer(tokenizer_corpus(list(office.titles.values()), examples), 1024)


@pytest.fixture(scope="module")
def trained_tiny(tokenizer, office):
    """The embedded tiny Llama (GQA: 4 heads over 2 kv heads), briefly fine-tuned on Office windows."""
    from gdrt_core.embedded import SIZES, build_model

    torch.manual_seed(0)
    model = build_model(SIZES["tiny"], len(tokenizer), seed=0)
    with torch.random.fork_rng(devices=[]):
        return quick_sft(model, tokenizer, office.examples("train", limit=400), steps=40)


@pytest.fixture(scope="module")
def trie(tokenizer, office):
    return build_trie(tokenizer, office.titles)


@pytest.fixture(scope="module")
def allowed(tokenizer, trie):
    return dict_trie(tokenizer, trie.titles)


@pytest.fixture(scope="module")
def test_prompts(tokenizer, office):
    return [tokenize_prompt(tokenizer, render("office", list(e.history_titles))).input_ids
            for e in office.examples("test", limit=16)]


@pytest.fixture(scope="module")
def default_reference(trained_tiny, tokenizer, trie, allowed, test_prompts):
    return hf_reference(trained_tiny, tokenizer, trie, test_prompts, BeamSearchSettings(), allowed)


def assert_same_rankings(ours, reference):
    for got, want in zip(ours, reference, strict=True):
        assert got.titles == [t for t, _ in want]
        assert got.scores == pytest.approx([s for _, s in want], abs=1e-3, rel=1e-5)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("shared_prompt", [True, False], ids=["shared-prompt", "model-forward"])
def test_exact_against_generate_on_office(trained_tiny, tokenizer, trie, test_prompts, default_reference,
                                          shared_prompt):
    """Default settings (sum of log-probs, early_stopping=False), length-sorted batches with left padding."""
    settings = BeamSearchSettings(shared_prompt=shared_prompt)
    ours = rank_prompts(trained_tiny, trie.to_torch(), test_prompts, settings, batch_size=6,
                        pad_token_id=tokenizer.pad_token_id)
    assert_same_rankings(ours, default_reference)
    for ranking in ours:
        assert len(ranking.titles) == 10 and len(set(ranking.titles)) == 10
        assert all(t in trie.titles for t in ranking.titles)
        assert ranking.scores == sorted(ranking.scores, reverse=True)


@pytest.mark.parametrize(
    "settings",
    [
        BeamSearchSettings(length_penalty=1.0),
        BeamSearchSettings(length_penalty=1.0, early_stopping="never"),
        BeamSearchSettings(early_stopping=True),
        BeamSearchSettings(renormalize=True),
        BeamSearchSettings(num_beams=6, num_return_sequences=4),
    ],
    ids=["lp1", "lp1-never", "early-stop", "renormalize", "6-beams-4-returned"],
)
def test_exact_against_generate_other_settings(trained_tiny, tokenizer, trie, allowed, test_prompts, settings):
    prompts = test_prompts[:5]
    reference = hf_reference(trained_tiny, tokenizer, trie, prompts, settings, allowed)
    ours = constrained_beam_search(trained_tiny, trie.to_torch(), prompts, settings, pad_token_id=tokenizer.pad_token_id)
    assert_same_rankings(ours, reference)


def test_early_stopping_counts_only_real_hypotheses(trained_tiny, tokenizer, trie, allowed, test_prompts):
    """early_stopping=True with length_penalty 1: generate counts its -1e9 placeholder hypotheses as finished
    and stops with fewer than K real titles; here the search stops when K real titles are finished. Every real
    title generate returns is in our ranking with the same score, and ours is full."""
    settings = BeamSearchSettings(length_penalty=1.0, early_stopping=True)
    prompts = test_prompts[:5]
    reference = hf_reference(trained_tiny, tokenizer, trie, prompts, settings, allowed)
    ours = constrained_beam_search(trained_tiny, trie.to_torch(), prompts, settings, pad_token_id=tokenizer.pad_token_id)
    assert any(len(ref) < settings.num_return_sequences for ref in reference)  # the case: generate stopped early
    for ref, ranking in zip(reference, ours, strict=True):
        assert len(ranking.titles) == settings.num_return_sequences
        score_of = dict(zip(ranking.titles, ranking.scores, strict=True))
        for title, score in ref:
            assert score_of[title] == pytest.approx(score, abs=1e-4)


def test_best_unconstrained_continuation_is_not_a_title(trained_tiny, tokenizer, trie, allowed, test_prompts):
    """A +30 logit bias on a token that no title starts with makes it the model's clear first choice;
    constrained decoding must still return 10 distinct catalogue titles, as the oracle does."""
    banned = next(t for t in range(len(tokenizer)) if t not in allowed[()] and t != tokenizer.eos_token_id)
    head = trained_tiny.get_output_embeddings()

    def bias(module, inputs, output):
        output = output.clone()
        output[..., banned] += 30.0
        return output

    handle = head.register_forward_hook(bias)
    try:
        prompts = test_prompts[:3]
        with torch.no_grad():
            first = trained_tiny(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax().item()
            greedy = trained_tiny.generate(torch.tensor([prompts[0]]), max_new_tokens=5, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)[0, len(prompts[0]):].tolist()
        assert first == banned and trie.walk(greedy) is None  # unconstrained: not a title
        settings = BeamSearchSettings()
        ours = constrained_beam_search(trained_tiny, trie.to_torch(), prompts, settings,
                                       pad_token_id=tokenizer.pad_token_id)
        assert_same_rankings(ours, hf_reference(trained_tiny, tokenizer, trie, prompts, settings, allowed))
        for ranking in ours:
            assert len(set(ranking.titles)) == 10 and all(t in trie.titles for t in ranking.titles)
    finally:
        handle.remove()


def test_lora_wrapped_model_uses_the_same_search(trained_tiny, tokenizer, trie, test_prompts):
    """A PEFT model (LoRA on q/v, non-zero B) ranks the same with shared-prompt decoding and model forward."""
    import copy

    from gdrt_core.models import apply_lora

    peft_model = apply_lora(copy.deepcopy(trained_tiny), r=4, alpha=8, dropout=0.0).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    prompts = test_prompts[:4]
    tt = trie.to_torch()
    shared = constrained_beam_search(peft_model, tt, prompts, BeamSearchSettings(), pad_token_id=tokenizer.pad_token_id)
    forward = constrained_beam_search(peft_model, tt, prompts, BeamSearchSettings(shared_prompt=False),
                                      pad_token_id=tokenizer.pad_token_id)
    plain = constrained_beam_search(trained_tiny, tt, prompts, BeamSearchSettings(), pad_token_id=tokenizer.pad_token_id)
    assert [r.titles for r in shared] == [r.titles for r in forward]
    assert [r.scores for r in shared] != [r.scores for r in plain]  # the adapter is really applied


def test_segment_log_softmax_hand_computed():
    """Renormalisation over the allowed tokens of each beam.

    Beam 0 allows tokens with log-probs log(0.1), log(0.3): their mass is 0.4, so the renormalised
    log-probs are log(0.1 / 0.4) = log(0.25) and log(0.3 / 0.4) = log(0.75).
    Beam 1 allows one token with log-prob log(0.05): alone it gets probability 1, log-prob 0.
    """
    values = torch.tensor([math.log(0.1), math.log(0.3), math.log(0.05)])
    segments = torch.tensor([0, 0, 1])
    got = _segment_log_softmax(values, segments, 2)
    assert got.tolist() == pytest.approx([math.log(0.25), math.log(0.75), 0.0], abs=1e-6)


def test_settings_are_checked(trained_tiny, trie, test_prompts):
    with pytest.raises(ValueError, match="num_return_sequences"):
        constrained_beam_search(trained_tiny, trie.to_torch(), test_prompts[:1],
                                BeamSearchSettings(num_beams=2, num_return_sequences=3))
    with pytest.raises(ValueError, match="early_stopping"):
        constrained_beam_search(trained_tiny, trie.to_torch(), test_prompts[:1],
                                BeamSearchSettings(early_stopping="sometimes"))
    with pytest.raises(ValueError, match="matmul_dtype"):
        constrained_beam_search(trained_tiny, trie.to_torch(), test_prompts[:1],
                                BeamSearchSettings(matmul_dtype="int8"))


def test_bfloat16_linear_is_the_rounded_product(trained_tiny):
    """The bfloat16 path of one projection: x and W rounded to bfloat16, multiplied, returned as float32.

    Hand-checkable case: x = [1 + 2^-10] rounds to 1.0 in bfloat16 (8 significant bits), W = [[3.0]] is exact,
    so the product is 3.0 (float32 would give 3.0029296875); the bias (0.5) is added in float32.
    """
    from gdrt_core.generation import SharedPromptDecoder

    decoder = SharedPromptDecoder(trained_tiny, torch.bfloat16)
    # every plain projection of the blocks has a bfloat16 copy; the model's own weights stay float32
    assert len(decoder.low) == 7 * trained_tiny.config.num_hidden_layers
    assert all(w.dtype == torch.bfloat16 for w in decoder.low.values())
    assert all(p.dtype == torch.float32 for p in trained_tiny.parameters())
    layer = torch.nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(3.0)
        layer.bias.fill_(0.5)
    decoder.low[layer] = layer.weight.detach().to(torch.bfloat16)
    got = decoder._linear(layer, torch.tensor([[1.0 + 2**-10]]))
    assert got.dtype == torch.float32 and got.item() == 3.5
    assert layer(torch.tensor([[1.0 + 2**-10]])).item() == pytest.approx(3.0029296875 + 0.5)


def test_bfloat16_matmuls_rank_like_the_oracle(trained_tiny, tokenizer, trie, test_prompts, default_reference):
    """bfloat16 matmuls change scores by rounding only: on the fine-tuned tiny model (peaked distributions,
    no near-ties in these lists) the rankings equal `generate`'s and the scores agree to 0.05."""
    ours = rank_prompts(trained_tiny, trie.to_torch(), test_prompts, BeamSearchSettings(matmul_dtype="bfloat16"),
                        batch_size=6, pad_token_id=tokenizer.pad_token_id)
    for got, want in zip(ours, default_reference, strict=True):
        assert got.titles == [t for t, _ in want]
        assert got.scores == pytest.approx([s for _, s in want], abs=0.05)


def _tiny_causal_lm(kind: str, vocab_size: int):
    """Random 2-layer models of other architectures (init std 0.2: peaked, far from ties)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases, GQA
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             initializer_range=0.2, use_sliding_window=False)
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                        initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_other_architectures_match_the_oracle(kind, tokenizer, trie, allowed, test_prompts):
    """Qwen2 takes the shared-prompt path; GPT-2 (not Llama-family) falls back to the model's forward."""
    from gdrt_core.generation import SharedPromptDecoder

    model = _tiny_causal_lm(kind, len(tokenizer))
    assert SharedPromptDecoder.supports(model) == (kind == "qwen2")
    prompts = test_prompts[:2]
    settings = BeamSearchSettings()
    ours = constrained_beam_search(model, trie.to_torch(), prompts, settings, pad_token_id=tokenizer.pad_token_id)
    assert_same_rankings(ours, hf_reference(model, tokenizer, trie, prompts, settings, allowed))


def test_common_prefix_length_hand_computed():
    from gdrt_core.generation import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8], [7, 8]]) == 2
    assert common_prefix_length([[1, 2], [3, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([]) == 0


def test_shared_prefix_prefill_equals_prompt_by_prompt(trained_tiny, test_prompts):
    """The task template runs once per batch: each prompt's logits and stored keys/values are those of running
    it alone (to float32 rounding), for prompts of different lengths right-aligned in the store."""
    from gdrt_core.generation import SharedPromptDecoder, common_prefix_length

    prompts = test_prompts[:4]
    assert common_prefix_length(prompts) > 10 and len({len(p) for p in prompts}) > 1  # a template, ragged
    batch = SharedPromptDecoder(trained_tiny)
    with torch.no_grad():
        logits = batch.prefill(prompts, "cpu")  # [4, vocab]
        for e, prompt in enumerate(prompts):
            alone = SharedPromptDecoder(trained_tiny)
            assert torch.allclose(logits[e], alone.prefill([prompt], "cpu")[0], atol=1e-4)
            n = len(prompt)
            for i in range(len(batch.layers)):
                assert torch.allclose(batch.prompt_kt[i][e, :, :, -n:], alone.prompt_kt[i][0], atol=1e-5)
                assert torch.allclose(batch.prompt_v[i][e, :, -n:], alone.prompt_v[i][0], atol=1e-5)
            assert torch.isinf(batch.prompt_bias[e, :-n]).all() and (batch.prompt_bias[e, -n:] == 0).all()
    # the model's own forward agrees on the last token's logits
    with torch.no_grad():
        full = trained_tiny(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert torch.allclose(logits[0], full, atol=1e-4)


def test_filler_rows_are_not_computed_and_change_nothing(trained_tiny, tokenizer, trie, test_prompts,
                                                         default_reference, monkeypatch):
    """Rows of examples with fewer than num_beams running beams (fillers) skip the linears and the LM head:
    the live rows' logits equal a step over every row, the search still equals `generate`, and fewer rows
    are computed than decoded."""
    from gdrt_core import generation

    computed = {"rows": 0, "live": 0}
    step = generation.SharedPromptDecoder.step

    def counted(decoder, tokens, positions, src_rows, rows_per_example, live=None):
        computed["rows"] += len(tokens)
        computed["live"] += len(tokens) if live is None else len(live)
        return step(decoder, tokens, positions, src_rows, rows_per_example, live)

    monkeypatch.setattr(generation.SharedPromptDecoder, "step", counted)
    ours = rank_prompts(trained_tiny, trie.to_torch(), test_prompts, BeamSearchSettings(), batch_size=6,
                        pad_token_id=tokenizer.pad_token_id)
    assert_same_rankings(ours, default_reference)
    assert computed["live"] < computed["rows"]

    # one step by hand: 2 examples x 3 beams, rows 1 and 5 fillers
    monkeypatch.setattr(generation.SharedPromptDecoder, "step", step)
    prompts = test_prompts[:2]
    tokens = torch.tensor([5, 6, 7, 8, 9, 10])
    positions = torch.tensor([len(prompts[0])] * 3 + [len(prompts[1])] * 3)
    src = torch.arange(6)
    live = torch.tensor([0, 2, 3, 4])
    with torch.no_grad():
        every, some = generation.SharedPromptDecoder(trained_tiny), generation.SharedPromptDecoder(trained_tiny)
        every.prefill(prompts, "cpu"), some.prefill(prompts, "cpu")
        all_rows = every.step(tokens, positions, src, 3)  # [6, vocab]
        live_rows = some.step(tokens, positions, src, 3, live)  # [4, vocab]
    assert live_rows.shape[0] == 4
    assert torch.allclose(live_rows, all_rows[live], atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"], ids=["shared-prompt", "model-forward"])
def test_no_prompts_rank_nothing(kind, tokenizer, trie):
    """An empty list of prompts raised a bare ValueError from inside the search (the prefill's min() of no
    lengths, or a forward over an empty batch); no prompts now have no rankings, as rank_prompts already had."""
    model = _tiny_causal_lm(kind, len(tokenizer))
    assert constrained_beam_search(model, trie.to_torch(), [], pad_token_id=tokenizer.pad_token_id) == []
    assert rank_prompts(model, trie.to_torch(), [], pad_token_id=tokenizer.pad_token_id) == []
