"""GDRT vs SFT optimiser-step time on the same batches, tokens/s, and the cost of the batch policy's look-ahead.

Runs the real training path (GdrtTrainer, `train_dataset` = Office windows tokenised with the embedded
tokenizer) for a tiny model and a ~100M-parameter Llama config, and times each optimiser step with a
callback (median over the timed steps, after warm-up steps). Modes, each on the same data order:

  sft        accumulation 1          the baseline
  gdrt       accumulation 1          batch policy, weights from the step's own forward (no look-ahead)
  sft/A      accumulation A          baseline for the split batch
  lagged/A   accumulation A          weights from the previous step: no extra forward
  batch/A    accumulation A          exact weights: a no-grad look-ahead forward over the A micro-batches

    .venv/bin/python benchmarks/bench_train.py --sizes tiny,100m --steps 4 --threads 1 --out bench_train.json

The ~100M model is LlamaConfig(hidden 768, 14 layers, 12 heads, intermediate 2048) on the embedded
tokenizer's vocabulary, randomly initialised (speed does not depend on the weights).

The pretrained backbone (converted once by `python -m gdrt_core.pretrained fetch smollm2-135m`), LoRA (r 8 on
q_proj / v_proj) and full fine-tuning, AdamW, its own tokenizer, the same modes with A = 2; prints the GDRT /
SFT step-time ratios of the run (wall and process CPU time, which a shared machine disturbs less):

    .venv/bin/python benchmarks/bench_train.py --pretrained smollm2-135m --tunings lora,full --batch 2 \
        --steps 3 --repeats 2 --threads 1 --out bench_train_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    # name: (LlamaConfig overrides, per-device batch, accumulation for the split modes)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2), 8, 4),
    "100m": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                  num_key_value_heads=12), 1, 2),
}


def build(size: str, vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    overrides, _, _ = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True, **overrides)
    return LlamaForCausalLM(cfg)


def stand_in_groups(features: list[dict], num_groups: int = 4) -> list[dict]:
    """Give each target token a stand-in group (a stable hash of its token id), in place: the Groups artifact's
    work is not what is timed here."""
    for f in features:
        f["group_ids"] = [zlib.crc32(str(t).encode()) % num_groups if g >= 0 else g
                          for t, g in zip(f["input_ids"], f["group_ids"], strict=True)]
    return features


def time_mode(model_state, size, vocab, features, tok, *, objective, policy, batch, accum, steps, warmup, work,
              make_model=None, optim="sgd", cpu=None, sampling="random"):
    """Median seconds per optimiser step and target+prompt tokens per second for one mode.

    make_model: builds the model (default: the `size` config with `model_state`); cpu: a list that receives
    the median process CPU seconds per step (all threads of this process; other jobs do not count);
    sampling: the Trainer's `train_sampling_strategy` ("sequential" keeps the order of `features`). On a GPU the
    clock waits for the device at each step end.
    """
    import torch
    from transformers import TrainerCallback

    from gdrt_core.train import TrainConfig
    from gdrt_core.train.data import StepWeights, TrainCollator
    from gdrt_core.train.loop import training_arguments
    from gdrt_core.train.trainer import GdrtTrainer

    if make_model is None:
        model = build(size, vocab)
        model.load_state_dict(model_state)
    else:
        model = make_model()
    cfg = TrainConfig(dataset="-", model="-", out=str(work), objective=objective, optim=optim, lr=1e-4,
                      scheduler="constant", max_steps=warmup + steps, batch_size=batch, grad_accum=accum,
                      eval_every=0, save_every=0, log_every=10**6, lora=False, seed=0, max_grad_norm=0.0)
    args = training_arguments(cfg, Path(work), has_valid=False)
    args.save_strategy = "no"
    args.train_sampling_strategy = sampling
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    stamps: list[float] = []
    cpu_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()
            stamps.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    groups = 4 if objective == "gdrt" else 1
    trainer = GdrtTrainer(model=model, args=args, train_dataset=features, data_collator=TrainCollator(tok.pad_token_id),
                          processing_class=tok, step_weights=StepWeights(groups, objective=objective, policy=policy),
                          callbacks=[Clock()])
    trainer.train()
    # on_step_begin fires after the Trainer prefetched the step (and ran the look-ahead): time step ends
    ends = stamps[1::2]
    per_step = [b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:], strict=True)] if warmup else []
    seconds = statistics.median(per_step)
    if cpu is not None:
        cpu.append(statistics.median(b - a for a, b in zip(cpu_ends[warmup - 1:-1], cpu_ends[warmup:], strict=True)))
    n_examples = batch * accum
    tokens = sum(len(f["input_ids"]) for f in features[: n_examples * (warmup + steps)]) / (warmup + steps)
    return seconds, tokens / seconds


def time_loss_head(features, vocab: int, n_examples: int, reps: int = 20) -> dict[str, float]:
    """Process CPU seconds for the loss computation alone (forward + backward from the logits), SFT vs GDRT.

    The step-level timings on a shared CPU are noisier than the difference being measured; this isolates
    the only code that differs between the two objectives: group sums, the weights, the surrogate.
    """
    import torch

    from gdrt_core.loss import dro_weights, group_losses_from_sums, group_sums, sft_loss, weighted_group_loss
    from gdrt_core.train.data import pad_batch, shifted

    batch = pad_batch(features[:n_examples], pad_token_id=2)
    logits_leaf = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)  # [batch, seq, vocab]
    out: dict[str, float] = {}
    for name in ("sft", "gdrt"):
        samples = []
        for _ in range(reps):
            start = time.process_time()
            logits, labels, groups = shifted(logits_leaf, batch["labels"], batch["group_ids"])
            if name == "sft":
                loss = sft_loss(logits, labels)
            else:  # what GdrtTrainer does with one micro-batch: weights from its own forward
                sums, counts = group_sums(logits, labels, groups, num_groups=4)
                w = dro_weights(group_losses_from_sums(sums.detach().double(), counts), counts)
                loss = weighted_group_loss(sums, w, counts)
            loss.backward()
            logits_leaf.grad = None
            samples.append(time.process_time() - start)
        out[name] = statistics.median(samples)
    return out


def time_lookahead(model_state, size: str, vocab: int, features, batch: int, accum: int, reps: int) -> dict[str, float]:
    """Seconds of the look-ahead (no-grad forward + group sums over the step's micro-batches) against the
    step's forward + backward over the same micro-batches, interleaved `reps` times (medians)."""
    import torch

    from gdrt_core.loss import group_sums
    from gdrt_core.train.data import pad_batch, shifted

    model = build(size, vocab)
    model.load_state_dict(model_state)
    model.train()
    micro = [pad_batch(features[i * batch:(i + 1) * batch], pad_token_id=2) for i in range(accum)]
    lookahead, train = [], []
    for _ in range(reps):
        start = time.perf_counter()
        with torch.no_grad():
            for mb in micro:
                logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                group_sums(*shifted(logits, mb["labels"], mb["group_ids"]), num_groups=4)
        lookahead.append(time.perf_counter() - start)
        start = time.perf_counter()
        for mb in micro:
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            sums, _ = group_sums(*shifted(logits, mb["labels"], mb["group_ids"]), num_groups=4)
            sums.sum().backward()
        model.zero_grad(set_to_none=True)
        train.append(time.perf_counter() - start)
    return {"lookahead": statistics.median(lookahead), "forward_backward": statistics.median(train)}


def pretrained_ratios(name: str, tunings: list[str], batch: int, accum: int, *, steps: int, warmup: int,
                      repeats: int, work: Path) -> dict:
    """GDRT / SFT step time on a pretrained backbone, LoRA and full fine-tuning, modes interleaved per round.

    Modes (each from the same weights, on the same windows in the same order): sft and gdrt (default policy
    `batch`) with the optimiser batch in one micro-batch; sft/A, lagged/A and batch/A (look-ahead) with it
    split into A micro-batches.
    """
    from gdrt_core.curate import CurateConfig
    from gdrt_core.curate import run as curate
    from gdrt_core.dataset import Dataset
    from gdrt_core.models import ModelConfig, load_model, load_tokenizer, prepare_for_training
    from gdrt_core.pretrained import converted_dir, get_pretrained
    from gdrt_core.train.data import build_features

    model_dir, _ = converted_dir(get_pretrained(name))
    if not (work / "ds").exists():
        curate(CurateConfig(source=str(REPO / "data" / "office"), format="sliding", domain="office",
                            out=str(work / "ds")))
    tok = load_tokenizer(str(model_dir))
    n_examples = batch * (warmup + steps)
    features = stand_in_groups(build_features(Dataset(work / "ds"), "train", tok, limit=n_examples))
    micro = batch // accum
    modes = {
        "sft": ("sft", "batch", batch, 1),
        "gdrt": ("gdrt", "batch", batch, 1),
        f"sft/{accum}": ("sft", "batch", micro, accum),
        f"lagged/{accum}": ("gdrt", "lagged", micro, accum),
        f"batch/{accum}": ("gdrt", "batch", micro, accum),
    }
    out: dict = {"model": name, "windows_per_step": batch, "tokens_per_window":
                 sum(len(f["input_ids"]) for f in features) / len(features), "tunings": {},
                 # the only code that differs between the objectives, timed alone (the steps are noisier)
                 "loss_head_seconds": time_loss_head(features, len(tok), batch)}
    print(json.dumps({"loss_head_seconds": out["loss_head_seconds"]}), flush=True)
    for tuning in tunings:
        lora = tuning == "lora"

        def make(lora=lora):
            return prepare_for_training(load_model(str(model_dir), device="none"), ModelConfig(lora=lora))

        wall: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):
            for mode, (objective, policy, b, acc) in modes.items():
                sec, _ = time_mode(None, "-", 0, features, tok, objective=objective, policy=policy, batch=b,
                                   accum=acc, steps=steps, warmup=warmup, work=work / "run", make_model=make,
                                   optim="adamw_torch", cpu=cpu[mode])
                wall[mode].append(sec)
                print(f"{name} {tuning:4s} {mode:9s} {sec:7.2f} s/step wall {cpu[mode][-1]:7.2f} s/step CPU",
                      flush=True)
        row: dict = {"seconds_per_step": {}, "cpu_seconds_per_step": {}}
        for mode in modes:
            row["seconds_per_step"][mode] = statistics.median(wall[mode])
            row["cpu_seconds_per_step"][mode] = statistics.median(cpu[mode])
        for key, clock in (("wall", "seconds_per_step"), ("cpu", "cpu_seconds_per_step")):
            t = row[clock]
            row[f"gdrt_over_sft_{key}"] = t["gdrt"] / t["sft"]
            row[f"lagged_over_sft_split_{key}"] = t[f"lagged/{accum}"] / t[f"sft/{accum}"]
            row[f"batch_over_sft_split_{key}"] = t[f"batch/{accum}"] / t[f"sft/{accum}"]
        head = out["loss_head_seconds"]
        row["loss_head_overhead_of_sft_step_cpu"] = (head["gdrt"] - head["sft"]) / row["cpu_seconds_per_step"]["sft"]
        out["tunings"][tuning] = row
        print(json.dumps({tuning: row}, indent=2), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    from gdrt_core.curate import CurateConfig
    from gdrt_core.curate import run as curate
    from gdrt_core.dataset import Dataset
    from gdrt_core.embedded import EmbeddedConfig
    from gdrt_core.embedded import run as init_model
    from gdrt_core.models import load_tokenizer
    from gdrt_core.train.data import build_features

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,100m")
    p.add_argument("--steps", type=int, default=4, help="timed optimiser steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="rounds over the modes (interleaved, to spread noise)")
    p.add_argument("--out", default=None)
    p.add_argument("--head-only", action="store_true", help="only the loss-head timing (no training steps)")
    p.add_argument("--pretrained", default=None, help="a pretrained backbone (smollm2-135m) instead of --sizes")
    p.add_argument("--tunings", default="lora,full", help="with --pretrained: lora, full or both")
    p.add_argument("--batch", type=int, default=2, help="with --pretrained: windows per optimiser step")
    p.add_argument("--accum", type=int, default=2, help="with --pretrained: micro-batches of the split modes")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if a.pretrained:
        results = {"threads": a.threads, "torch": torch.__version__,
                   "pretrained": pretrained_ratios(a.pretrained, a.tunings.split(","), a.batch, a.accum,
                                                   steps=a.steps, warmup=a.warmup, repeats=a.repeats, work=work)}
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return results
    curate(CurateConfig(source=str(REPO / "data" / "office"), format="sliding", domain="office", out=str(work / "ds")))
    init_model(EmbeddedConfig(dataset=str(work / "ds"), out=str(work / "model"), size="tiny"))
    tok = load_tokenizer(str(work / "model"))
    vocab = len(tok)
    features = stand_in_groups(build_features(Dataset(work / "ds"), "train", tok, limit=256))

    results: dict = {"threads": a.threads, "torch": torch.__version__, "sizes": {}}
    for size in a.sizes.split(","):
        _, batch, accum = SIZES[size]
        model = build(size, vocab)
        n_params = sum(p.numel() for p in model.parameters())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        del model
        modes = {
            "sft": ("sft", "batch", batch * accum, 1),
            "gdrt": ("gdrt", "batch", batch * accum, 1),
            f"sft/{accum}": ("sft", "batch", batch, accum),
            f"lagged/{accum}": ("gdrt", "lagged", batch, accum),
            f"batch/{accum}": ("gdrt", "batch", batch, accum),
        }
        if a.head_only:
            head = time_loss_head(features, vocab, batch * accum)
            look = time_lookahead(state, size, vocab, features, batch, accum, reps=a.repeats)
            results["sizes"][size] = {"params": n_params, "loss_head_seconds": head, "lookahead_seconds": look,
                                      "lookahead_share": look["lookahead"] / look["forward_backward"]}
            print(size, json.dumps(results["sizes"][size]), flush=True)
            continue
        times: dict[str, list[float]] = {m: [] for m in modes}
        tps: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(a.repeats):
            for name, (objective, policy, b, acc) in modes.items():
                sec, tok_s = time_mode(state, size, vocab, features, tok, objective=objective, policy=policy, batch=b,
                                       accum=acc, steps=a.steps, warmup=a.warmup, work=work / "run")
                times[name].append(sec)
                tps[name].append(tok_s)
                print(f"{size} {name:10s} {sec:8.3f} s/step {tok_s:10.0f} tokens/s", flush=True)
        med = {m: statistics.median(v) for m, v in times.items()}
        row = {
            "params": n_params, "examples_per_step": batch * accum,
            "seconds_per_step": med, "tokens_per_s": {m: statistics.median(v) for m, v in tps.items()},
            "gdrt_overhead": med["gdrt"] / med["sft"] - 1.0,
            "lagged_overhead_split": med[f"lagged/{accum}"] / med[f"sft/{accum}"] - 1.0,
            "lookahead_cost_split": med[f"batch/{accum}"] / med[f"lagged/{accum}"] - 1.0,
        }
        head = time_loss_head(features, vocab, batch * accum)
        row["loss_head_seconds"] = head
        row["loss_head_overhead_of_step"] = (head["gdrt"] - head["sft"]) / med["sft"]
        look = time_lookahead(state, size, vocab, features, batch, accum, reps=max(3, a.repeats))
        row["lookahead_seconds"] = look
        row["lookahead_share"] = look["lookahead"] / look["forward_backward"]
        results["sizes"][size] = row
        print(json.dumps({size: row}, indent=2), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
