"""Examples/s of gdrt's constrained beam search vs the reference (`generate` + dict trie), same run.

For each model size (the embedded tiny / small Llamas), on the Office test split:

1. train the tokenizer, build the model and fine-tune it briefly (response-only cross-entropy), so that
   its distributions look like a trained recommender's rather than a random model's;
2. time the reference: `model.generate(num_beams=10, num_return_sequences=10,
   prefix_allowed_tokens_fn=<dict trie>)` one example at a time (the oracle of
   tests/unit/test_generation.py), and the same call on left-padded batches;
3. time gdrt's `rank_prompts` with shared-prompt decoding (the default) and with the model's own forward;
4. check that every top-10 list equals the reference's.

    .venv/bin/python benchmarks/bench_generation.py --sizes tiny small --examples 64

Prints a Markdown table (docs/benchmarks.md, "Evaluation").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def _oracle_module():
    spec = importlib.util.spec_from_file_location("gdrt_generation_oracle", REPO / "tests" / "unit" / "test_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(path: str | None) -> Path:
    from gdrt_core.curate import CurateConfig, run

    if path:
        return Path(path)
    out = Path(tempfile.mkdtemp(prefix="bench-gen-")) / "office"
    run(CurateConfig(source=str(REPO / "data" / "office"), format="sliding", domain="office", out=str(out)))
    return out


def _batched_reference(model, tokenizer, trie, prompts, allowed, batch_size: int) -> None:
    """`generate` with the dict trie on left-padded batches (timing only: padding changes the numerics)."""
    import torch

    from gdrt_core.generation import left_pad

    eos = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        input_ids, attention_mask, _ = left_pad(batch, tokenizer.pad_token_id, model.device)
        width = input_ids.shape[1]

        def allowed_fn(batch_id, sequence, width=width):
            return allowed.get(tuple(sequence[width:].tolist()), [eos])

        with torch.no_grad():
            model.generate(
                input_ids, attention_mask=attention_mask, num_beams=10, num_return_sequences=10,
                max_new_tokens=trie.max_depth, prefix_allowed_tokens_fn=allowed_fn, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
            )


def bench_size(size_name: str, dataset_dir: Path, args, oracle) -> dict:

    from gdrt_core.dataset import Dataset
    from gdrt_core.embedded import SIZES, build_model, tokenizer_corpus, train_tokenizer
    from gdrt_core.generation import BeamSearchSettings, rank_prompts
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import tokenize_prompt
    from gdrt_core.trie import build_trie

    size = SIZES[size_name]
    dataset = Dataset(dataset_dir)
    examples = [(list(e.history_titles), e.target_title) for e in dataset.examples("train", limit=8)]
    tokenizer = train_tokenizer(tokenizer_corpus(list(dataset.titles.values()), examples), size.vocab)
    model = build_model(size, len(tokenizer), seed=0).to(args.device)
    started = time.perf_counter()
    oracle.quick_sft(model, tokenizer, dataset.examples("train", limit=2000), steps=args.train_steps)
    train_s = time.perf_counter() - started
    trie = build_trie(tokenizer, dataset.titles)
    torch_trie = trie.to_torch(args.device)
    allowed = oracle.dict_trie(tokenizer, trie.titles)
    prompts = [tokenize_prompt(tokenizer, render(dataset.domain, list(e.history_titles))).input_ids
               for e in dataset.examples("test", limit=args.examples)]
    n = len(prompts)
    settings = BeamSearchSettings()

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    reference, ref_s = timed(lambda: oracle.hf_reference(model, tokenizer, trie, prompts, settings, allowed))
    _, ref_batched_s = timed(lambda: _batched_reference(model, tokenizer, trie, prompts, allowed, args.batch_size))
    ours, ours_s = timed(lambda: rank_prompts(model, torch_trie, prompts, settings, batch_size=args.batch_size,
                                              pad_token_id=tokenizer.pad_token_id))
    forward_settings = BeamSearchSettings(shared_prompt=False)
    ours_fwd, ours_fwd_s = timed(lambda: rank_prompts(model, torch_trie, prompts, forward_settings,
                                                      batch_size=args.batch_size, pad_token_id=tokenizer.pad_token_id))
    want = [[t for t, _ in r] for r in reference]
    return {
        "size": size_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": n,
        "sft_steps": args.train_steps,
        "sft_seconds": round(train_s, 1),
        "prompt_tokens_mean": round(sum(map(len, prompts)) / n, 1),
        "reference_ex_per_s": n / ref_s,
        "reference_batched_ex_per_s": n / ref_batched_s,
        "ours_ex_per_s": n / ours_s,
        "ours_forward_ex_per_s": n / ours_fwd_s,
        "speedup": ref_s / ours_s,
        "speedup_vs_batched_reference": ref_batched_s / ours_s,
        "mismatched_lists": sum(r.titles != w for r, w in zip(ours, want, strict=True)),
        "mismatched_lists_forward": sum(r.titles != w for r, w in zip(ours_fwd, want, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--examples", type=int, default=64, help="test examples ranked by every method")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=60, help="quick SFT steps before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for every method)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (float32 either way)")
    parser.add_argument("--dataset", help="a curated Office Dataset dir (default: curate data/office)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    oracle = _oracle_module()
    dataset_dir = _dataset(args.dataset)
    results = [bench_size(s, dataset_dir, args, oracle) for s in args.sizes]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"\n{args.device}: {device}, torch threads {args.threads}, "
          f"torch {torch.__version__}, batch {args.batch_size}, num_beams 10\n")
    print("| model | params | examples | prompt tokens | reference (ex/s) | reference, batched (ex/s) "
          "| gdrt (ex/s) | gdrt, model forward (ex/s) | speed-up | vs batched | lists differing |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['size']} | {r['parameters']:,} | {r['examples']} | {r['prompt_tokens_mean']} "
              f"| {r['reference_ex_per_s']:.2f} | {r['reference_batched_ex_per_s']:.2f} | {r['ours_ex_per_s']:.2f} "
              f"| {r['ours_forward_ex_per_s']:.2f} | {r['speedup']:.1f}x | {r['speedup_vs_batched_reference']:.1f}x "
              f"| {r['mismatched_lists']} / {r['mismatched_lists_forward']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
