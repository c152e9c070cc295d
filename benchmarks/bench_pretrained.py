"""Cost of the pretrained backbone (SmolLM2-135M-Instruct, de-quantised to float32) per Office window, one run.

Measures, on the device given (CPU by default), with the converted model from the cache
(`python -m gdrt_core.pretrained fetch smollm2-135m`):

1. training: seconds per window of forward + backward + AdamW step, right-padded batches built by
   `tokenize_example`, LoRA (r 8 on q_proj / v_proj) and full fine-tuning;
2. grouping: seconds per window of the history-masked teacher-forced scoring (`gdrt group`'s work);
3. evaluation: seconds per window of gdrt's constrained beam search (`rank_prompts`, 10 beams) with float32
   and with bfloat16 matmuls, of the previous verified version of gdrt_core/generation.py (`--previous-rev`,
   read from git), and of the transformers reference (`generate` + `prefix_allowed_tokens_fn`, one example at
   a time, on the first --reference-windows windows: tens of seconds each); how many top-10 lists are
   identical; the arithmetic per window (counted from the search's pre-filled tokens and decoded rows) and the
   fraction of the floor it reaches (that arithmetic at the matmul rate these cores give in the same run).

    .venv/bin/python benchmarks/bench_pretrained.py --train-windows 8 --eval-windows 64 --threads 2
    .venv/bin/python benchmarks/bench_pretrained.py --only-evaluate --eval-windows 64 --reference-windows 8

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


def _previous_generation(rev: str):
    """gdrt_core/generation.py as of git revision `rev` (the already verified search), as a module."""
    import subprocess
    import types

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:gdrt_core/generation.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("gdrt_generation_previous")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:gdrt_core/generation.py", "exec"), module.__dict__)
    return module


def matmul_rate(dtype, timing: str = "wall", repeats: int = 20) -> float:
    """GFLOP/s of a [1024, 576] x [576, 1536] linear (SmolLM2's MLP shape): what these cores do at best now
    (per wall second, or per CPU second of this process with --timing cpu)."""
    import torch

    clock = time.process_time if timing == "cpu" else time.perf_counter
    x, w = torch.randn(1024, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    total = 0.0
    for _ in range(repeats):
        start = clock()
        for _ in range(10):
            torch.nn.functional.linear(x, w)
        total += clock() - start
    return 2 * 1024 * 576 * 1536 * 10 * repeats / total / 1e9


class SearchWork:
    """Counts the arithmetic of the shared-prompt search: pre-filled tokens, decoded rows, attention spans."""

    def __init__(self, generation):
        self.generation, self.prompt_tokens, self.prefill_attention, self.row_steps, self.attended = generation, 0, 0, 0, 0

    def __enter__(self):
        cls = self.generation.SharedPromptDecoder
        self.saved = cls.prefill, cls.step
        prefill, step = self.saved

        def counted_prefill(decoder, prompts, device):
            # the common prefix (run once, as the decoder does when it has one) plus each prompt's rest
            shared = self.generation.shared_prefix_length(prompts)
            self.prompt_tokens += shared + sum(len(p) - shared for p in prompts)
            pairs = lambda n: n * (n + 1) // 2  # noqa: E731 - causal query-key pairs of n tokens
            self.prefill_attention += pairs(shared) + sum(pairs(len(p)) - pairs(shared) for p in prompts)
            return prefill(decoder, prompts, device)

        def counted_step(decoder, tokens, positions, src_rows, rows_per_example, live=None):
            self.row_steps += len(tokens) if live is None else len(live)  # rows through the linears / LM head
            self.attended += int(positions.sum()) + len(tokens)  # keys each new token attends to (every row)
            return step(decoder, tokens, positions, src_rows, rows_per_example, live)

        cls.prefill, cls.step = counted_prefill, counted_step
        return self

    def __exit__(self, *exc):
        cls = self.generation.SharedPromptDecoder
        cls.prefill, cls.step = self.saved

    def flops(self, model, examples: int) -> float:
        """Multiply-adds x 2: block linears for every pre-filled token and decoded row, the LM head for
        every decoded row and each prompt's last token, attention's QK and PV products."""
        import torch

        cfg = model.config
        block = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in name)
        head = cfg.vocab_size * cfg.hidden_size
        attention = 2 * 2 * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * cfg.num_hidden_layers
        return (2 * block * (self.prompt_tokens + self.row_steps) + 2 * head * (examples + self.row_steps)
                + attention * (self.prefill_attention + self.attended))


def title_logprob(model, prompt: list[int], path: list[int]) -> float:
    """Teacher-forced sum of log-probs of `path` after `prompt` (float32, the model's forward)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + path])).logits[0, len(prompt) - 1:-1].float()
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(path)[:, None]).sum())


def time_evaluation(model_dir: Path, dataset, args, oracle) -> dict:
    """One run: the search as it is (float32 and bfloat16 matmuls), the previous verified version, the reference."""
    import torch

    from gdrt_core import generation
    from gdrt_core.generation import BeamSearchSettings, rank_prompts
    from gdrt_core.models import load_model, load_tokenizer
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import response_token_ids, tokenize_prompt
    from gdrt_core.trie import build_trie

    device = args.device
    model_dir = Path(args.model) if args.model else model_dir
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_model(model_dir, device=device, merge_adapter=True).eval()  # as gdrt evaluate loads it
    trie = build_trie(tokenizer, dataset.titles)
    torch_trie = trie.to_torch(device)
    prompts = [tokenize_prompt(tokenizer, render(dataset.domain, list(e.history_titles))).input_ids
               for e in dataset.examples("test", limit=args.eval_windows)]
    n, n_ref = len(prompts), min(args.reference_windows, len(prompts))
    previous = _previous_generation(args.previous_rev) if args.previous_rev != "none" else None
    pad = tokenizer.pad_token_id
    out: dict = {"windows": n, "reference_windows": n_ref, "batch_size": args.eval_batch_size, "workers": args.workers,
                 "previous_rev": args.previous_rev, "prompt_tokens_mean": sum(map(len, prompts)) / n}

    def timed(name, fn, windows):
        """Wall and CPU seconds per window: on a shared machine the process's CPU time (all its threads)
        is the stable measure of the work, the wall time depends on what else runs."""
        load = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            result = fn() if windows else []
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        out[name] = {"windows": windows, "wall_s_per_window": wall / max(windows, 1),
                     "cpu_s_per_window": cpu / max(windows, 1), "load_before": load, "load_after": os.getloadavg()[0]}
        out[name]["s_per_window"] = out[name][f"{args.timing}_s_per_window"]
        print(f"  {name}: {out[name]['wall_s_per_window']:.2f} s/window wall, {out[name]['cpu_s_per_window']:.2f} "
              f"CPU s/window over {windows} windows (load {load:.1f} -> {out[name]['load_after']:.1f})", flush=True)
        return result

    out["timing"] = args.timing
    out["matmul_gflops"] = {"float32": matmul_rate(torch.float32, args.timing),
                            "bfloat16": matmul_rate(torch.bfloat16, args.timing)}
    with SearchWork(generation) as work:
        ours = timed("gdrt_float32", lambda: rank_prompts(
            model, torch_trie, prompts, BeamSearchSettings(), batch_size=args.eval_batch_size, pad_token_id=pad), n)
    pooled = time_pooled(model_dir, dataset, args, n, timed) if args.workers > 1 else None
    bf16 = timed("gdrt_bfloat16", lambda: rank_prompts(
        model, torch_trie, prompts, BeamSearchSettings(matmul_dtype="bfloat16"), batch_size=args.eval_batch_size,
        pad_token_id=pad), n)
    before = previous and timed("previous", lambda: previous.rank_prompts(
        model, torch_trie, prompts, previous.BeamSearchSettings(), batch_size=args.eval_batch_size, pad_token_id=pad), n)
    reference = timed("reference", lambda: oracle.hf_reference(
        model, tokenizer, trie, prompts[:n_ref], BeamSearchSettings(), oracle.dict_trie(tokenizer, trie.titles)), n_ref)
    out["matmul_gflops_after"] = {"float32": matmul_rate(torch.float32, args.timing),
                                  "bfloat16": matmul_rate(torch.bfloat16, args.timing)}

    flops = work.flops(model, n)
    ref_titles = [[t for t, _ in r] for r in reference]
    out["work"] = {"prompt_tokens": work.prompt_tokens, "decoded_rows": work.row_steps, "gflop_per_window": flops / n / 1e9}
    for name in ("gdrt_float32", "gdrt_bfloat16", *(["previous"] if previous else [])):
        rate = (out["matmul_gflops"]["bfloat16"] if name == "gdrt_bfloat16" else out["matmul_gflops"]["float32"])
        out[name]["floor_s_per_window"] = flops / n / 1e9 / rate
        out[name]["floor_fraction"] = out[name]["floor_s_per_window"] / out[name]["s_per_window"]
        out[name]["speedup_vs_reference"] = (out["reference"]["s_per_window"] / out[name]["s_per_window"]
                                             if n_ref else None)
    if previous:
        out["gdrt_float32"]["speedup_vs_previous"] = out["previous"]["s_per_window"] / out["gdrt_float32"]["s_per_window"]
    out["gdrt_bfloat16"]["speedup_vs_float32"] = out["gdrt_float32"]["s_per_window"] / out["gdrt_bfloat16"]["s_per_window"]
    if pooled is not None:
        out["gdrt_workers"]["speedup_vs_reference"] = (out["reference"]["s_per_window"]
                                                       / out["gdrt_workers"]["s_per_window"] if n_ref else None)
        out["gdrt_workers"]["speedup_vs_float32"] = (out["gdrt_float32"]["s_per_window"]
                                                     / out["gdrt_workers"]["s_per_window"])
        out["gdrt_workers"]["identical_vs_float32"] = sum(a.titles == b.titles for a, b in zip(pooled, ours, strict=True))
        out["gdrt_workers"]["identical_vs_reference"] = sum(a.titles == b for a, b in zip(pooled, ref_titles, strict=False))
        out["gdrt_workers"]["max_score_difference_vs_float32"] = max(
            (abs(x - y) for a, b in zip(pooled, ours, strict=True) if a.titles == b.titles
             for x, y in zip(a.scores, b.scores, strict=True)), default=0.0)
    out["identical_lists"] = {
        **({"float32_vs_previous": sum(a.titles == b.titles for a, b in zip(ours, before, strict=True)),
            "previous_vs_reference": sum(a.titles == b for a, b in zip(before, ref_titles, strict=False))}
           if previous else {}),
        "float32_vs_reference": sum(a.titles == b for a, b in zip(ours, ref_titles, strict=False)),
        "bfloat16_vs_float32": sum(a.titles == b.titles for a, b in zip(bf16, ours, strict=True)),
        "bfloat16_vs_reference": sum(a.titles == b for a, b in zip(bf16, ref_titles, strict=False)),
    }
    out["max_score_difference_float32_vs_previous"] = max(
        (abs(x - y) for a, b in zip(ours, before, strict=True) if a.titles == b.titles
         for x, y in zip(a.scores, b.scores, strict=True)), default=0.0) if previous else None
    common = [abs(x - y) for a, b in zip(ours, bf16, strict=True) if a.titles == b.titles
              for x, y in zip(a.scores, b.scores, strict=True)]
    out["max_score_difference_bfloat16_vs_float32"] = max(common, default=0.0)
    # Where bfloat16 ranks differently: the float32 log-probs (teacher-forced) of the titles it ranks in
    # another order or that only one list has. A near-tie: two titles whose float32 scores are closer than
    # the bfloat16 score error.
    differences = []
    for i, (a, b) in enumerate(zip(ours, bf16, strict=True)):
        if a.titles == b.titles:
            continue
        rank = next((r for r, (x, y) in enumerate(zip(a.titles, b.titles, strict=False)) if x != y),
                    min(len(a.titles), len(b.titles)) - 1)
        pair = (a.titles[rank], b.titles[rank])
        exact = [title_logprob(model, prompts[i], response_token_ids(tokenizer, t)) for t in pair]
        differences.append({"window": i, "first_differing_rank": rank + 1, "float32_title": pair[0],
                            "bfloat16_title": pair[1], "float32_logprobs": exact,
                            "gap": abs(exact[0] - exact[1]), "bfloat16_title_in_float32_list": pair[1] in a.titles})
    out["bfloat16_differences"] = differences
    return out


def time_pooled(model_dir: Path, dataset, args, n: int, timed) -> list:
    """`gdrt evaluate --set workers=N` as it ranks (`evaluate._pooled_ranker`: N processes x 1 thread, float32,
    the model loaded and merged in each): the pool's start (model loads and a first batch each, out of the
    timing) apart, then the n windows."""
    from gdrt_core import evaluate
    from gdrt_core.generation import BeamSearchSettings

    config = evaluate.EvalConfig(dataset=str(dataset.root), model=str(model_dir), out="unused", split="test",
                                 workers=args.workers, threads=1, batch_size=args.eval_batch_size)
    examples = list(dataset.examples("test", limit=n))
    histories, ids = [list(e.history) for e in examples], [e.example_id for e in examples]
    with evaluate._pooled_ranker(config, dataset, BeamSearchSettings()) as rank:
        start = time.perf_counter()
        first = args.workers * args.eval_batch_size
        rank(histories[-first:], ids[-first:], lambda k: None)
        print(f"  pool of {args.workers}: started and ranked {first} windows in {time.perf_counter() - start:.1f} s",
              flush=True)
        return timed("gdrt_workers", lambda: rank(histories, ids, lambda k: None), n)


def print_evaluation(ev: dict) -> None:
    ids = ev["identical_lists"]
    n, n_ref = ev["windows"], ev["reference_windows"]
    print(f"\nevaluation: {n} windows ({n_ref} with the reference), {ev['prompt_tokens_mean']:.0f} prompt tokens, "
          f"10 beams, batch {ev['batch_size']}; {ev['work']['gflop_per_window']:.0f} GFLOP per window "
          f"({ev['work']['decoded_rows'] / n:.0f} decoded beam rows per window); matmul "
          f"{ev['matmul_gflops']['float32']:.0f} GFLOP/s float32, {ev['matmul_gflops']['bfloat16']:.0f} bfloat16\n")
    print("| search | windows | s/window | vs reference | floor (s/window) | floor fraction | top-10 lists identical |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    vs_previous = f"{ids['float32_vs_previous']}/{n} vs previous, " if "previous" in ev else ""
    rows = (("gdrt, float32 (default)", "gdrt_float32", f"{vs_previous}{ids['float32_vs_reference']}/{n_ref} vs reference"),
            ("gdrt, bfloat16 matmuls", "gdrt_bfloat16",
             f"{ids['bfloat16_vs_float32']}/{n} vs float32, {ids['bfloat16_vs_reference']}/{n_ref} vs reference"),
            *([(f"previous ({ev['previous_rev']})", "previous", f"{ids['previous_vs_reference']}/{n_ref} vs reference")]
              if "previous" in ev else []))
    for label, key, note in rows:
        r = ev[key]
        vs_ref = f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-"
        print(f"| {label} | {r['windows']} | {r['s_per_window']:.2f} | {vs_ref} "
              f"| {r['floor_s_per_window']:.2f} | {r['floor_fraction']:.0%} | {note} |")
    if "gdrt_workers" in ev:
        r = ev["gdrt_workers"]
        vs_ref = f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-"
        print(f"| gdrt, float32, {ev['workers']} processes x 1 thread | {r['windows']} | {r['s_per_window']:.2f} | "
              f"{vs_ref} | | | {r['identical_vs_float32']}/{n} vs float32, {r['identical_vs_reference']}/{n_ref} "
              f"vs reference |")
    print(f"| transformers reference | {n_ref} | {ev['reference']['s_per_window']:.2f} | 1.0x | | | |")
    print(f"({ev['timing']} seconds; speed-ups against the reference need --reference-windows >= 1)")
    if "previous" in ev:
        print(f"\nfloat32 vs previous: {ev['gdrt_float32']['speedup_vs_previous']:.2f}x, max score difference "
              f"{ev['max_score_difference_float32_vs_previous']:.1e}", end="; ")
    print(f"bfloat16 vs float32: {ev['gdrt_bfloat16']['speedup_vs_float32']:.2f}x, max score difference "
          f"{ev['max_score_difference_bfloat16_vs_float32']:.2f}")
    for d in ev["bfloat16_differences"]:
        print(f"  window {d['window']}: rank {d['first_differing_rank']} float32 {d['float32_title'][:40]!r} vs "
              f"bfloat16 {d['bfloat16_title'][:40]!r}: float32 log-probs {d['float32_logprobs'][0]:.3f} / "
              f"{d['float32_logprobs'][1]:.3f} (gap {d['gap']:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=64, help="windows ranked by gdrt (float32, bfloat16, previous)")
    parser.add_argument("--reference-windows", type=int, default=8, help="the first N of them also by the reference")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="windows per beam-search batch (gdrt evaluate's default)")
    parser.add_argument("--previous-rev", default="f5f53b3",
                        help="git revision of the previous, verified generation.py to compare with (none: skip)")
    parser.add_argument("--only-evaluate", action="store_true", help="skip training and grouping")
    parser.add_argument("--timing", choices=("wall", "cpu"), default="wall",
                        help="evaluation ratios from wall time, or from this process's CPU time (a shared machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2,
                        help="also rank with gdrt evaluate's pool of this many processes x 1 thread (1: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", help="a curated Office Dataset dir (default: curate data/office)")
    parser.add_argument("--model", help="evaluate this model dir (e.g. a fine-tuned SmolLM2 adapter) instead of the "
                                        "base model")
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
        "model": args.model or "smollm2-135m", "parameters": facts["num_parameters"], "device": args.device,
        "threads": args.threads, "torch": torch.__version__,
        "processor": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
    }
    if not args.only_evaluate:
        results["train_lora"] = time_training(model_dir, dataset, args.train_windows, args.batch_size, lora=True,
                                              device=args.device)
        results["train_full"] = time_training(model_dir, dataset, args.train_windows, args.batch_size, lora=False,
                                              device=args.device)
        results["group"] = time_grouping(model_dir, dataset_dir, args.group_windows, args.device, work)
    results["evaluate"] = time_evaluation(model_dir, dataset, args, _oracle_module())
    load.append(os.getloadavg()[0])
    results["load_average"] = load
    print(f"\n{args.device}: {results['processor']}, torch threads {args.threads}, torch {torch.__version__}, "
          f"load average {load[0]:.1f} -> {load[1]:.1f}\n")
    if not args.only_evaluate:
        print("| work | windows | seconds per window | note |")
        print("| --- | ---: | ---: | --- |")
        for key, label in (("train_lora", "train, LoRA (r 8, q/v)"), ("train_full", "train, full fine-tuning")):
            r = results[key]
            print(f"| {label} | {r['windows']} | {r['s_per_window']:.2f} | {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['trainable']:,} trainable, batch {args.batch_size} |")
        print(f"| group (history-masked scoring) | {results['group']['windows']} | {results['group']['s_per_window']:.2f} | |")
    print_evaluation(results["evaluate"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
