"""Cost of the pretrained backbone (SmolLM2-135M-Instruct, de-quantised to float32) per Office window, one run.

Measures, on the device given (CPU by default), with the converted model from the cache
(`python -m gdrt_core.pretrained fetch smollm2-135m`):

1. training: seconds per window of forward + backward + AdamW step, right-padded batches built by
   `tokenize_example`, LoRA (r 8 on q_proj / v_proj) and full fine-tuning;
2. grouping: seconds per window of the history-masked teacher-forced scoring (`gdrt group`'s work);
3. evaluation: seconds per window of gdrt's constrained beam search (`rank_prompts`, 10 beams) and of the
   transformers reference (`generate` + `prefix_allowed_tokens_fn`, one example at a time), and how many
   top-10 lists differ.

    .venv/bin/python benchmarks/bench_pretrained.py --train-windows 8 --eval-windows 6 --threads 2

Prints a Markdown table (docs/benchmarks.md, "Pretrained backbone") and writes --json when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GDRT_TRACKING", "off")  # a measurement, not a run to keep
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import _dataset, _oracle_module  # noqa: E402 - the same Office data and oracle


def time_training(model_dir: Path, dataset, windows: int, batch: int, *, lora: bool, device: str) -> dict:
    import torch

    from gdrt_core.models import ModelConfig, load_model, load_tokenizer, prepare_for_training
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import IGNORE_INDEX, tokenize_example

    tokenizer = load_tokenizer(model_dir)
    model = prepare_for_training(load_model(model_dir, device=device), ModelConfig(lora=lora))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    examples = [tokenize_example(tokenizer, render(dataset.domain, list(e.history_titles), e.target_title))
                for e in dataset.examples("train", limit=windows + batch)]

    def step(chunk):
        width = max(len(x) for x in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([x.input_ids + [pad] * (width - len(x)) for x in chunk], device=device)  # [batch, seq]
        mask = torch.tensor([x.attention_mask + [0] * (width - len(x)) for x in chunk], device=device)
        labels = torch.tensor([x.labels + [IGNORE_INDEX] * (width - len(x)) for x in chunk], device=device)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(mask.sum())

    step(examples[:batch])  # warm-up (allocations, optimizer state)
    timed = examples[batch:batch + windows]
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(timed), batch):
        tokens += step(timed[i:i + batch])
    seconds = time.perf_counter() - start
    return {"windows": len(timed), "s_per_window": seconds / len(timed), "tokens_per_s": tokens / seconds,
            "trainable": sum(p.numel() for p in params)}


def time_grouping(model_dir: Path, dataset_dir: Path, windows: int, device: str, work: Path) -> dict:
    from gdrt_core.grouping import GroupConfig, run

    start = time.perf_counter()
    run(GroupConfig(dataset=str(dataset_dir), reference=str(model_dir), out=str(work / "groups"), num_groups=2,
                    splits=["train"], limit=windows, device=device, progress=False))
    seconds = time.perf_counter() - start
    return {"windows": windows, "s_per_window": seconds / windows}


def time_evaluation(model_dir: Path, dataset, windows: int, device: str, oracle) -> dict:
    from gdrt_core.generation import BeamSearchSettings, rank_prompts
    from gdrt_core.models import load_model, load_tokenizer
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import tokenize_prompt
    from gdrt_core.trie import build_trie

    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_model(model_dir, device=device)
    trie = build_trie(tokenizer, dataset.titles)
    allowed = oracle.dict_trie(tokenizer, trie.titles)
    prompts = [tokenize_prompt(tokenizer, render(dataset.domain, list(e.history_titles))).input_ids
               for e in dataset.examples("test", limit=windows)]
    settings = BeamSearchSettings()
    start = time.perf_counter()
    ours = rank_prompts(model, trie.to_torch(device), prompts, settings, batch_size=8,
                        pad_token_id=tokenizer.pad_token_id)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = oracle.hf_reference(model, tokenizer, trie, prompts, settings, allowed)
    ref_s = time.perf_counter() - start
    want = [[t for t, _ in r] for r in reference]
    return {
        "windows": len(prompts), "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "ours_s_per_window": ours_s / len(prompts), "reference_s_per_window": ref_s / len(prompts),
        "speedup": ref_s / ours_s, "lists_differing": sum(r.titles != w for r, w in zip(ours, want, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", help="a curated Office Dataset dir (default: curate data/office)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from gdrt_core.dataset import Dataset
    from gdrt_core.pretrained import converted_dir, get_pretrained

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir, facts = converted_dir(get_pretrained("smollm2-135m"))
    dataset_dir = _dataset(args.dataset)
    dataset = Dataset(dataset_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-pretrained-work-"))
    load = [os.getloadavg()[0]]
    results = {
        "model": "smollm2-135m", "parameters": facts["num_parameters"], "device": args.device,
        "threads": args.threads, "torch": torch.__version__,
        "processor": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "train_lora": time_training(model_dir, dataset, args.train_windows, args.batch_size, lora=True, device=args.device),
        "train_full": time_training(model_dir, dataset, args.train_windows, args.batch_size, lora=False, device=args.device),
        "group": time_grouping(model_dir, dataset_dir, args.group_windows, args.device, work),
        "evaluate": time_evaluation(model_dir, dataset, args.eval_windows, args.device, _oracle_module()),
    }
    load.append(os.getloadavg()[0])
    results["load_average"] = load
    ev = results["evaluate"]
    print(f"\n{args.device}: {results['processor']}, torch threads {args.threads}, torch {torch.__version__}, "
          f"load average {load[0]:.1f} -> {load[1]:.1f}\n")
    print("| work | windows | seconds per window | note |")
    print("| --- | ---: | ---: | --- |")
    for key, label in (("train_lora", "train, LoRA (r 8, q/v)"), ("train_full", "train, full fine-tuning")):
        r = results[key]
        print(f"| {label} | {r['windows']} | {r['s_per_window']:.2f} | {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['trainable']:,} trainable, batch {args.batch_size} |")
    print(f"| group (history-masked scoring) | {results['group']['windows']} | {results['group']['s_per_window']:.2f} | |")
    print(f"| evaluate, gdrt beam search | {ev['windows']} | {ev['ours_s_per_window']:.2f} | "
          f"{ev['prompt_tokens_mean']:.0f} prompt tokens, 10 beams |")
    print(f"| evaluate, transformers reference | {ev['windows']} | {ev['reference_s_per_window']:.2f} | "
          f"speed-up {ev['speedup']:.1f}x, top-10 lists differing: {ev['lists_differing']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
