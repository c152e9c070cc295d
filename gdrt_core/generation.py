"""Constrained beam search over the catalogue trie: batched, KV-cached, and exact w.r.t. Hugging Face.

The result equals `model.generate(num_beams=K, num_return_sequences=N, prefix_allowed_tokens_fn=<trie>,
length_penalty=lp, early_stopping=es, renormalize_logits=...)` (transformers' beam search, the reference
the tests compare against), but runs several times faster because:

- the prompt is pre-filled once per example, not once per beam (`generate` copies every prompt K times
  before the first forward), and the K beams then share that KV cache via `reorder_cache`;
- the allowed tokens of all beams of all examples come from one tensor lookup in the CSR trie
  (`TorchTrie.expand`) instead of a Python call per beam per step;
- an example leaves the batch as soon as its ranking is final, instead of riding along until the last
  example of the batch is done;
- for Llama-family models (`SharedPromptDecoder`) the prompt's keys/values are stored once per example
  and only the generated tokens' keys/values follow the beams, so nothing prompt-sized is copied per step.
  It also pre-fills each prompt alone on SDPA's causal path (no padding, no 4D mask), runs the tokens all
  prompts of a batch start with (the task template) once, and computes the linears and the LM head only for
  real beams (an example with fewer than K running beams pads its slots with fillers whose logits are never
  read). Its attention sums in another order than the model's kernel, so scores can differ in the last bits
  (rankings are equal unless two titles tie to ~1e-6); `shared_prompt=False` uses the model's forward.

`matmul_dtype="bfloat16"` runs the decoder blocks' matmuls in bfloat16 (about 1.25x less CPU time on a
fine-tuned SmolLM2-135M with avx512_bf16, docs/benchmarks.md); scores then move by rounding (up to ~0.4 there)
and the beams kept early can change (10 of 64 top-10 lists differed), so the default keeps the model's dtype
and the exactness below.

Semantics (the vectorised beam search of transformers 5.x, the version pinned in pyproject.toml, reproduced
step by step; tests/unit/test_generation.py checks it against `generate`):

1. Scores are `log_softmax(logits)` in float32, then disallowed tokens are masked (-inf); with
   `renormalize=True` the allowed log-probs are re-normalised per beam (`renormalize_logits`).
   A beam's score is the sum of its tokens' scores.
2. Step 1 expands the single prompt beam. Each step takes the top 2K candidates over (beam, token) of
   every example; candidates ending in EOS whose rank is < K become finished hypotheses with score
   `sum / generated_length ** length_penalty` (generated_length counts EOS); the best K of the
   candidates that did not end in EOS keep running.
3. Each example keeps its best K finished hypotheses. It stops when K are finished and no running beam
   can beat the worst of them by HF's heuristic: best running score / L ** length_penalty <= worst
   finished, with L = tokens generated so far (`early_stopping=False`, and `"never"` with
   length_penalty <= 0) or `max_new_tokens` (`"never"` with length_penalty > 0); `early_stopping=True`
   stops as soon as K are finished. With length_penalty 0 the heuristic is exact: scores only decrease.
   Only real hypotheses count: `generate` also counts its placeholders (below), so with
   `early_stopping=True` and length_penalty > 0 it can stop with fewer than K real titles where this
   search goes on to K; the titles it does return are in this ranking with the same scores.
4. The ranking is the finished hypotheses by descending score (at most `num_return_sequences`).
   Every path is a trie path, so every entry is a catalogue title, and distinct leaves are distinct
   titles (duplicate titles share one path), so a title appears at most once.

Where `generate` pads (beams 1..K-1 start at -1e9; fewer than K real candidates), its extra sequences are
placeholders with scores near -1e9 (possibly duplicates); here such slots are simply absent. The real
hypotheses and their order are the same. `max_new_tokens` is the trie's depth, so no title is cut.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gdrt_core.collate import length_batches, pad_token_ids
from gdrt_core.trie import TorchTrie


@dataclass(frozen=True)
class BeamSearchSettings:
    """Decoding settings (the names and meanings of transformers' generation config)."""

    num_beams: int = 10
    num_return_sequences: int = 10
    length_penalty: float = 0.0  # 0.0: sum of log-probs; 1.0: divided by the generated length
    early_stopping: bool | str = False  # False, True or "never", as in transformers
    renormalize: bool = False  # re-normalise log-probs over the allowed tokens
    shared_prompt: bool = True  # SharedPromptDecoder when the model supports it (same results, faster)
    # None: the model's dtype throughout; "bfloat16": SharedPromptDecoder multiplies bfloat16 copies of the
    # decoder blocks' linear weights (residual stream, attention, LM head, log-softmax stay in the model's dtype)
    matmul_dtype: str | None = None


_MATMUL_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Ranking:
    """One example's recommendations, best first."""

    titles: list[str]
    scores: list[float]
    leaves: list[int]  # trie leaf node of each title


def _cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: `cache` (transformers 5) or `past_key_values` (4.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _segment_log_softmax(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """log_softmax of `values` within each segment (= renormalise each beam over its allowed tokens)."""
    seg_max = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    seg_max = seg_max.scatter_reduce(0, segments, values, reduce="amax")  # [segments]
    shifted = values - seg_max[segments]  # [edges]
    seg_sum = torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(
        0, segments, shifted.exp()
    )  # [segments]
    return shifted - seg_sum.log()[segments]


class SharedPromptDecoder:
    """Pre-fill and decoding steps for Llama-family models that keep each prompt's KV cache once, not once per beam.

    `prefill` runs every prompt alone (no padding, so attention takes SDPA's causal fast path instead of an
    explicit 4D mask) and keeps its keys/values ([examples, kv_heads, prompt, head_dim]) where they are; in
    the last layer only the last position's query, attention output and MLP are computed (the logits of the
    last token are all the search needs). In `step`, only the keys/values of the generated tokens
    ([rows, kv_heads, step, head_dim], a few dozen positions) follow the beams. Attention of a beam = one
    softmax over [its example's prompt positions, its own generated positions]. `generate` instead copies
    the whole cache num_beams times and then twice more per step (append + beam reorder), which dominates
    its run time on long prompts.

    The layer maths is the model's own modules (norms, projections incl. LoRA, MLP, rotary embedding);
    only the attention product is computed here, in float32 softmax as the eager implementation does.
    With `matmul_dtype=torch.bfloat16` on a float32 model, the plain `nn.Linear` layers of the decoder
    blocks (q/k/v/o projections, MLP) multiply bfloat16 copies of their weights (made once per call, so
    weights that change between calls are seen) and return to float32; the residual stream, norms, rotary
    embedding, attention, the LM head and log-softmax stay float32 (a bfloat16 LM head rounds every logit
    by up to ~0.06 and doubled the score differences measured on SmolLM2). LoRA-wrapped layers keep the
    model's dtype.
    Supported: model types in SUPPORTED without sliding-window attention; others use `generate`-style
    decoding with the model's forward (`constrained_beam_search(..., shared_prompt=False)`).
    """

    SUPPORTED = ("llama", "mistral", "qwen2")

    def __init__(self, model, matmul_dtype: torch.dtype | None = None):
        import sys

        self.lm = _unwrap(model)
        body = self.lm.model
        self.layers = list(body.layers[: self.lm.config.num_hidden_layers])
        self.embed, self.norm, self.rotary = body.embed_tokens, body.norm, body.rotary_emb
        self.lm_head = self.lm.lm_head
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups  # query heads per kv head
        self.scaling = attn.scaling
        self.dtype = self.embed.weight.dtype  # the residual stream's
        # module -> its weight in matmul_dtype (only plain nn.Linear: LoRA layers run as they are)
        self.low: dict = {}
        if matmul_dtype is not None and matmul_dtype != self.dtype:
            modules = []
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                modules += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
            self.low = {mod: mod.weight.detach().to(matmul_dtype) for mod in modules if type(mod) is torch.nn.Linear}
        self.beam_k: list = [None] * len(self.layers)  # [rows, kv_heads, generated, head_dim] each
        self.beam_v: list = [None] * len(self.layers)

    @classmethod
    def supports(cls, model) -> bool:
        lm = _unwrap(model)
        config = getattr(lm, "config", None)
        if config is None or getattr(config, "model_type", None) not in cls.SUPPORTED:
            return False
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return False
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            return False
        body = getattr(lm, "model", None)
        return all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        weight = self.low.get(module)
        if weight is None:
            return module(x)
        y = torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)
        return y if module.bias is None else y + module.bias

    def _mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        if mlp.gate_proj not in self.low and mlp.up_proj not in self.low and mlp.down_proj not in self.low:
            return mlp(x)
        return self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(self.lm_head, self.norm(hidden))

    def prefill(self, prompts: Sequence[Sequence[int]], device) -> torch.Tensor:
        """Logits [examples, vocab] of each prompt's last token; stores the prompts' keys/values.

        Prompts are right-aligned in the key/value store (as `collate.pad_token_ids` lays them out); the positions
        before a shorter prompt get bias -inf, so no beam attends to them. The tokens all prompts of the batch
        start with (the task template) are run once: a token's keys/values depend only on the tokens before it,
        so every prompt's suffix attends to the same prefix keys/values.
        """
        width = max(len(p) for p in prompts)
        kv_heads = self.layers[0].self_attn.k_proj.out_features // self.head_dim
        shape = (len(prompts), kv_heads, width, self.head_dim)
        # keys stored transposed ([examples, kv_heads, head_dim, prompt]): the per-step product reads them in order
        self.prompt_kt = [torch.zeros(shape, dtype=self.dtype, device=device).transpose(2, 3) for _ in self.layers]
        self.prompt_v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.prompt_bias = torch.full((len(prompts), width), float("-inf"), device=device)  # [examples, prompt]
        shared = shared_prefix_length(prompts)
        prefix_k = prefix_v = None
        if shared > 0:
            prefix_k, prefix_v, _ = self._run(list(prompts[0][:shared]), None, None, device, logits=False)
        last_hidden = []
        for e, prompt in enumerate(prompts):
            start = width - len(prompt)
            self.prompt_bias[e, start:] = 0.0
            keys, values, hidden = self._run(list(prompt[shared:]), prefix_k, prefix_v, device, logits=True)
            for i in range(len(self.layers)):
                self.prompt_kt[i][e, :, :, start:] = keys[i][0].transpose(1, 2)
                self.prompt_v[i][e, :, start:] = values[i][0]
            last_hidden.append(hidden[:, -1])
        return self._logits(torch.cat(last_hidden))  # [examples, vocab]

    def _run(self, tokens: list[int], past_k, past_v, device, *, logits: bool):
        """One prompt segment through the blocks, after `past` keys/values ([1, kv_heads, past, head_dim] per
        layer, or None). Returns the segment's keys/values including the past, per layer, and the last hidden
        state [1, 1, hidden] (None with logits=False: the last layer then only computes keys/values).

        Attention is SDPA's causal kernel without a past, and a lower-right causal mask with one; in the last
        layer only the last token's query, attention output and MLP are computed.
        """
        from torch.nn.functional import scaled_dot_product_attention

        n = len(tokens)
        past = 0 if past_k is None else past_k[0].shape[2]
        hidden = self.embed(torch.as_tensor(tokens, dtype=torch.long, device=device)[None])  # [1, n, hidden]
        cos, sin = self.rotary(hidden, torch.arange(past, past + n, device=device)[None])
        mask = None if past == 0 else torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
        last_layer = len(self.layers) - 1
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = self._linear(attn.q_proj, x).view(1, n, -1, self.head_dim).transpose(1, 2)  # [1, heads, n, head_dim]
            k = self._linear(attn.k_proj, x).view(1, n, -1, self.head_dim).transpose(1, 2)  # [1, kv_heads, n, head_dim]
            v = self._linear(attn.v_proj, x).view(1, n, -1, self.head_dim).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            if past:
                k, v = torch.cat((past_k[i], k), dim=2), torch.cat((past_v[i], v), dim=2)
            keys.append(k)
            values.append(v)
            if i == last_layer:
                if not logits:
                    return keys, values, None
                q, hidden = q[:, :, -1:], hidden[:, -1:]  # the last token sees every key: no mask
            causal = i < last_layer
            out = scaled_dot_product_attention(
                q, k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1),
                attn_mask=mask if causal else None, is_causal=causal and mask is None, scale=self.scaling,
            )  # [1, heads, n or 1, head_dim]
            hidden = hidden + self._linear(attn.o_proj, out.transpose(1, 2).reshape(1, q.shape[2], -1))
            hidden = hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        return keys, values, hidden

    def keep_examples(self, keep: torch.Tensor) -> None:
        """Drop finished examples from the prompt cache (`keep` = indices of the remaining ones)."""
        self.prompt_kt = [k.index_select(0, keep) for k in self.prompt_kt]
        self.prompt_v = [v.index_select(0, keep) for v in self.prompt_v]
        self.prompt_bias = self.prompt_bias.index_select(0, keep)

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, src_rows: torch.Tensor, rows_per_example: int,
        live: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [live rows, vocab] for one new token per beam; beam caches reordered by `src_rows` first.

        `live` (row indices, ascending; None = all rows) are the rows whose logits are needed: the others are
        fillers of examples with fewer than num_beams running beams. Only live rows go through the linears,
        the MLP and the LM head; fillers keep their slot (zero keys/values) so the layout stays [examples, beams].
        """
        rows = len(tokens)
        examples = rows // rows_per_example
        if live is not None and len(live) == rows:
            live = None
        if live is not None:
            tokens, positions = tokens[live], positions[live]
        hidden = self.embed(tokens[:, None])  # [live, 1, hidden]
        cos, sin = self.rotary(hidden, positions[:, None])
        n = len(tokens)

        def all_rows(t: torch.Tensor) -> torch.Tensor:  # [live, ...] -> [rows, ...], zeros for fillers
            return t if live is None else t.new_zeros((rows, *t.shape[1:])).index_copy_(0, live, t)

        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = self._linear(attn.q_proj, x).view(n, 1, -1, self.head_dim).transpose(1, 2)  # [live, heads, 1, head_dim]
            k = self._linear(attn.k_proj, x).view(n, 1, -1, self.head_dim).transpose(1, 2)  # [live, kv_heads, 1, head_dim]
            v = self._linear(attn.v_proj, x).view(n, 1, -1, self.head_dim).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            q, k, v = all_rows(q), all_rows(k), all_rows(v)  # [rows, ...]
            if self.beam_k[i] is None:
                self.beam_k[i], self.beam_v[i] = k, v
            else:
                self.beam_k[i] = torch.cat((self.beam_k[i].index_select(0, src_rows), k), dim=2)
                self.beam_v[i] = torch.cat((self.beam_v[i].index_select(0, src_rows), v), dim=2)
            kv_heads = k.shape[1]
            # prompt part: the beams of one example share its prompt keys
            q_by_example = q.reshape(examples, rows_per_example, kv_heads, self.groups, self.head_dim)
            q_by_example = q_by_example.permute(0, 2, 1, 3, 4).reshape(examples, kv_heads, -1, self.head_dim)
            prompt_scores = torch.matmul(q_by_example, self.prompt_kt[i]).float() * self.scaling
            prompt_scores = prompt_scores + self.prompt_bias[:, None, None, :]  # [examples, kv_heads, beams*groups, prompt]
            prompt_scores = prompt_scores.view(examples, kv_heads, rows_per_example, self.groups, -1)
            prompt_scores = prompt_scores.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, self.groups, -1)
            # generated part: each beam's own tokens
            q_by_row = q.reshape(rows, kv_heads, self.groups, self.head_dim)
            beam_scores = torch.matmul(q_by_row, self.beam_k[i].transpose(2, 3)).float() * self.scaling
            probs = torch.softmax(torch.cat((prompt_scores, beam_scores), dim=-1), dim=-1).to(q.dtype)
            prompt_len = prompt_scores.shape[-1]
            prompt_probs = probs[..., :prompt_len].reshape(examples, rows_per_example, kv_heads, self.groups, -1)
            prompt_probs = prompt_probs.permute(0, 2, 1, 3, 4).reshape(examples, kv_heads, -1, prompt_len)
            out = torch.matmul(prompt_probs, self.prompt_v[i])  # [examples, kv_heads, beams*groups, head_dim]
            out = out.view(examples, kv_heads, rows_per_example, self.groups, self.head_dim)
            out = out.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, self.groups, self.head_dim)
            out = out + torch.matmul(probs[..., prompt_len:], self.beam_v[i])  # [rows, kv_heads, groups, head_dim]
            if live is not None:
                out = out.index_select(0, live)  # [live, kv_heads, groups, head_dim]
            hidden = residual + self._linear(attn.o_proj, out.reshape(n, 1, -1))
            hidden = hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        return self._logits(hidden)[:, -1, :]  # [live, vocab]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all `sequences` share (0 for none or an empty list)."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        for j in range(length):
            if other[j] != first[j]:
                length = j
                break
    return length


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens `SharedPromptDecoder.prefill` runs once for a batch: the common prefix of two or more prompts,
    short of every prompt's last token (whose logits each prompt needs); 0 for a single prompt."""
    if len(prompts) < 2:
        return 0
    return min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def constrained_beam_search(
    model,
    trie: TorchTrie,
    prompts: Sequence[Sequence[int]],
    settings: BeamSearchSettings = BeamSearchSettings(),
    *,
    pad_token_id: int = 0,
) -> list[Ranking]:
    """Rank catalogue titles for each prompt (token ids ending with the response header), in one batch; no
    prompts, no rankings."""
    if settings.num_return_sequences > settings.num_beams:
        raise ValueError("num_return_sequences must be <= num_beams")
    if settings.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {settings.early_stopping!r}")
    if settings.matmul_dtype not in _MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be None, 'float32' or 'bfloat16', got {settings.matmul_dtype!r}")
    if not prompts:  # an empty batch would fail inside the prefill (or the model's forward)
        return []
    device = trie.indptr.device
    num_beams = settings.num_beams
    num_candidates = 2 * num_beams  # transformers keeps (1 + number of EOS tokens) * num_beams
    lp = float(settings.length_penalty)
    max_new_tokens = trie.trie.max_depth
    hypothetical_len_fixed = max_new_tokens if (settings.early_stopping == "never" and lp > 0.0) else None
    neg_inf = float("-inf")

    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)  # [batch]
    decoder = None
    if settings.shared_prompt and SharedPromptDecoder.supports(model):
        decoder = SharedPromptDecoder(model, _MATMUL_DTYPES[settings.matmul_dtype])
        logits = decoder.prefill(prompts, device)  # [rows, vocab]; one row per example at step 1
    else:
        input_ids, attention_mask, position_ids = (
            t.to(device) for t in pad_token_ids(prompts, pad_token_id)  # [batch, width] each, left-padded
        )
        cache = _new_cache(model)
        cache_kw = _cache_kwarg(model)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1, :]  # [rows, vocab]; one row per example at step 1
        del out

    results: list[Ranking | None] = [None] * len(prompts)
    example = torch.arange(len(prompts), device=device)  # [active] original index of each active example
    rows_per_example = 1
    node = torch.zeros(len(prompts), dtype=torch.long, device=device)  # [rows] trie node of each beam
    score = torch.zeros(len(prompts), dtype=torch.float32, device=device)  # [rows] running log-prob
    alive = torch.ones(len(prompts), dtype=torch.bool, device=device)  # [rows] real beam (not a filler)
    fin_score = torch.full((len(prompts), num_beams), neg_inf, device=device)  # [active, beams]
    fin_leaf = torch.full((len(prompts), num_beams), -1, dtype=torch.long, device=device)  # [active, beams]

    def finish(done_mask) -> None:
        for i in torch.nonzero(done_mask).flatten().tolist():
            scores_i = fin_score[i, : settings.num_return_sequences]
            keep = scores_i > neg_inf
            leaves = fin_leaf[i, : settings.num_return_sequences][keep].tolist()
            results[int(example[i])] = Ranking(
                titles=trie.trie.leaf_titles(leaves), scores=scores_i[keep].tolist(), leaves=leaves
            )

    for step in range(1, max_new_tokens + 1):
        num_active = len(example)
        log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [live rows, vocab]
        rows, tokens, children = trie.expand(node, alive)  # [edges] each
        live_index = torch.cumsum(alive, 0) - 1  # [rows] row -> its row in log_probs (alive rows only)
        edge_logp = log_probs[live_index[rows], tokens]  # [edges]
        if settings.renormalize:
            edge_logp = _segment_log_softmax(edge_logp, rows, len(node))
        edge_score = score[rows] + edge_logp  # [edges]

        # Candidates per example, laid out beam-major as transformers' [batch, beams * vocab] scores.
        edge_example = torch.div(rows, rows_per_example, rounding_mode="floor")  # [edges]
        per_example = torch.bincount(edge_example, minlength=num_active)  # [active]
        first_edge = torch.cumsum(per_example, 0) - per_example  # [active]
        slot = torch.arange(len(rows), device=device) - first_edge[edge_example]  # [edges]
        width = max(int(per_example.max()), 1)
        grid = torch.full((num_active, width), neg_inf, device=device)  # [active, width]
        grid[edge_example, slot] = edge_score
        k = min(num_candidates, width)
        top_score, top_slot = torch.topk(grid, k, dim=1)  # [active, k]
        top_valid = top_score > neg_inf
        top_edge = (first_edge[:, None] + top_slot).clamp(max=max(len(rows) - 1, 0))  # [active, k]
        top_token = tokens[top_edge]  # [active, k]
        top_child = children[top_edge]
        top_row = rows[top_edge]
        top_eos = top_valid & (top_token == trie.eos_token_id)

        # Finished hypotheses: EOS candidates among the first num_beams, length-penalised, merged.
        in_first = torch.arange(k, device=device)[None, :] < num_beams  # [1, k]
        new_fin = torch.where(top_eos & in_first, top_score / (step**lp), neg_inf)  # [active, k]
        merged_score = torch.cat((fin_score, new_fin), dim=1)  # [active, beams + k]
        merged_leaf = torch.cat((fin_leaf, top_child), dim=1)
        fin_score, order = torch.topk(merged_score, num_beams, dim=1)  # [active, beams]
        fin_leaf = torch.gather(merged_leaf, 1, order)

        # Running beams: the best num_beams candidates that did not end in EOS.
        run_candidates = torch.where(top_valid & ~top_eos, top_score, neg_inf)  # [active, k]
        if k < num_beams:
            pad = torch.full((num_active, num_beams - k), neg_inf, device=device)
            run_candidates = torch.cat((run_candidates, pad), dim=1)
        run_score, run_pick = torch.topk(run_candidates, num_beams, dim=1)  # [active, beams]
        run_pick = run_pick.clamp(max=k - 1)
        run_alive = run_score > neg_inf  # [active, beams]

        # Stopping, per example (transformers' early-stop heuristic, see the module docstring).
        all_finished = (fin_score > neg_inf).all(dim=1)  # [active]
        hyp_len = hypothetical_len_fixed if hypothetical_len_fixed is not None else step
        best_running = run_score[:, 0] / (hyp_len**lp)  # [active]
        done = all_finished & (best_running <= fin_score.min(dim=1).values)
        if settings.early_stopping is True:
            done |= all_finished
        done |= ~run_alive.any(dim=1)
        if step == max_new_tokens:
            done[:] = True
        finish(done)
        keep = torch.nonzero(~done).flatten()  # [active']
        if len(keep) == 0:
            break

        # Next step: the surviving examples' running beams, their cache rows reordered into place.
        run_pick = run_pick[keep]
        run_alive = run_alive[keep]
        src_row = torch.gather(top_row[keep], 1, run_pick)  # [active', beams]
        src_row = torch.where(run_alive, src_row, src_row[:, :1])  # fillers reuse a real beam's row
        next_token = torch.gather(top_token[keep], 1, run_pick)  # [active', beams]
        node = torch.gather(top_child[keep], 1, run_pick).flatten()  # [rows']
        score = run_score[keep].flatten()
        alive = run_alive.flatten()
        fin_score, fin_leaf = fin_score[keep], fin_leaf[keep]
        example = example[keep]
        src_row = src_row.flatten()  # [rows']
        positions = (prompt_lens[example] + step - 1).repeat_interleave(num_beams)  # [rows']
        live = torch.nonzero(alive).flatten()  # [live rows']: fillers' logits are never read
        if decoder is not None:
            if len(keep) < num_active:
                decoder.keep_examples(keep)
            logits = decoder.step(next_token.flatten(), positions, src_row, num_beams, live)  # [live rows', vocab]
        else:
            cache.reorder_cache(src_row)
            attention_mask = torch.cat(
                (attention_mask[src_row], torch.ones((len(src_row), 1), dtype=attention_mask.dtype, device=device)), 1
            )  # [rows', width + step]
            out = model(input_ids=next_token.reshape(-1, 1), attention_mask=attention_mask,
                        position_ids=positions[:, None], use_cache=True, **{cache_kw: cache})
            logits = out.logits[:, -1, :][live]  # [live rows', vocab]
            del out
        rows_per_example = num_beams
    return [r if r is not None else Ranking([], [], []) for r in results]


def rank_prompts(
    model,
    trie: TorchTrie,
    prompts: Sequence[Sequence[int]],
    settings: BeamSearchSettings = BeamSearchSettings(),
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Ranking]:
    """`constrained_beam_search` over many prompts, batched by similar length (less padding).

    Results come back in the order of `prompts`; `on_batch(n)` is called after each batch of n prompts.
    """

    results: list[Ranking | None] = [None] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], batch_size):
        for i, r in zip(idx, constrained_beam_search(
            model, trie, [prompts[i] for i in idx], settings, pad_token_id=pad_token_id
        ), strict=True):
            results[i] = r
        if on_batch is not None:
            on_batch(len(idx))
    return results  # type: ignore[return-value]
