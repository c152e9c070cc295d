"""The train stage: SFT or GDRT fine-tuning of a causal LM recommender -> Model artifact.

`run(config)` trains in the current process, or, when several processes or DeepSpeed are asked for,
re-executes `gdrt train` under torchrun with the resolved config. Checkpoints go to `<out>/checkpoints/`
every `save_every` steps; re-running the same command resumes from the newest intact one. The final
Model artifact (weights or LoRA adapter, tokenizer, config.yaml, trainer_state.json, train_metrics.json,
manifest.json) replaces `<out>` atomically.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdrt_core.config import field, load_config, to_dict
from gdrt_core.errors import GdrtError

CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    dataset: str = field(help="Dataset artifact directory (gdrt curate)")
    model: str = field(help="base model: hub id or directory (gdrt init-model writes one)")
    out: str = field(help="output Model directory (checkpoints live in <out>/checkpoints while training)")
    objective: str = field("sft", help="sft (token-mean cross-entropy) | gdrt (group-DRO over token groups)")
    groups: str | None = field(None, help="Groups artifact directory (gdrt group); required for objective gdrt")
    num_groups: int | None = field(None, help="number of token groups (default: from the Groups artifact)")
    tau: float = field(1.0, help="GDRT temperature: large -> prior-weighted mean, small -> worst group")
    prior: str = field("uniform", help="group prior pi: uniform | size (group token frequency)")
    weights: str = field("batch", help="weights policy: batch (exact, look-ahead when split) | lagged (previous step)")
    ema: float = field(0.0, help="moving average of the group losses used for the weights, in [0, 1); 0 = off")
    lr: float = field(1e-4, help="peak learning rate")
    epochs: float = field(3.0, help="training epochs (ignored when max_steps is set)")
    max_steps: int | None = field(None, help="stop after this many optimiser steps (None = epochs)")
    batch_size: int = field(8, help="per-device micro-batch size")
    grad_accum: int = field(1, help="gradient accumulation steps (optimiser batch = batch_size x accum x processes)")
    optim: str = field("adamw_torch", help="Trainer optimiser name (adamw_torch, sgd, ...)")
    weight_decay: float = field(0.0, help="weight decay")
    warmup_ratio: float = field(0.0, help="share of the steps with a linear learning-rate warm-up")
    scheduler: str = field("linear", help="learning-rate schedule (Trainer lr_scheduler_type)")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0 = off)")
    seed: int = field(42, help="seed of the model initialisation (LoRA) and dropout")
    data_seed: int | None = field(None, help="seed of the data order (None = seed); kept across a resume")
    max_train: int | None = field(None, help="use at most this many training windows (the first N)")
    valid_size: int = field(200, help="valid windows used for the valid loss and NDCG@10 (the first N)")
    eval_every: int = field(50, help="evaluate the valid loss every N optimiser steps (0 = once per epoch)")
    save_every: int = field(50, help="write a checkpoint every N optimiser steps (0 = once per epoch)")
    keep_checkpoints: int = field(2, help="checkpoints kept in <out>/checkpoints while training")
    log_every: int = field(10, help="log loss / group stats / tokens/s every N optimiser steps")
    select_best: bool = field(False, help="finish with the checkpoint of the lowest valid loss (never test)")
    eval_at_start: bool = field(True, help="evaluate the valid loss before training (stored in train_metrics.json)")
    ndcg_every_epoch: bool = field(True, help="valid NDCG@10 on the valid sample at each epoch end")
    lora: bool = field(True, help="train LoRA adapters (False = full fine-tuning)")
    lora_r: int = field(8, help="LoRA rank")
    lora_alpha: int = field(16, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_target_modules: list[str] = field(
        ["q_proj", "v_proj"], help="modules that get LoRA adapters (GPT-2: c_attn; auto = peft's default for the model)"
    )
    bf16: str = field("auto", help="auto (bf16 on a GPU that supports it, fp32 on CPU) | true | false")
    deepspeed: str | None = field(None, help="DeepSpeed ZeRO: zero2 | zero3 | zero3-offload (None = off)")
    num_gpus: int = field(1, help="processes to launch (one per GPU; on CPU, processes over gloo)")
    trust_remote_code: bool = field(False, help="run modelling code shipped with a hub model")
    cpu_threads: int | None = field(None, help="torch threads when training on CPU (None = torch's default)")


def validate(config: TrainConfig) -> None:
    """Errors that can be found before any heavy import or output."""
    from gdrt_core.train.deepspeed import STAGES

    if config.objective not in ("sft", "gdrt"):
        raise GdrtError(f"objective {config.objective!r} is unknown", path="train config", hint="use sft or gdrt")
    if config.objective == "gdrt" and not config.groups:
        raise GdrtError("objective gdrt needs token groups", path="train config",
                        hint="pass --groups DIR (written by gdrt group)")
    if config.weights not in ("batch", "lagged"):
        raise GdrtError(f"weights {config.weights!r} is unknown", path="train config", hint="use batch or lagged")
    if config.prior not in ("uniform", "size"):
        raise GdrtError(f"prior {config.prior!r} is unknown", path="train config", hint="use uniform or size")
    if not config.tau > 0:
        raise GdrtError(f"tau must be > 0, got {config.tau}", path="train config")
    if not 0.0 <= config.ema < 1.0:
        raise GdrtError(f"ema must be in [0, 1), got {config.ema}", path="train config")
    if config.deepspeed is not None and config.deepspeed not in STAGES:
        raise GdrtError(f"deepspeed {config.deepspeed!r} is unknown", hint=f"use one of {', '.join(STAGES)}")
    config.bf16 = str(config.bf16).lower()  # YAML / --set give a boolean for true and false
    if config.bf16 not in ("auto", "true", "false"):
        raise GdrtError(f"bf16 {config.bf16!r} is not auto, true or false", path="train config")
    for name in ("batch_size", "grad_accum", "num_gpus"):
        if getattr(config, name) < 1:
            raise GdrtError(f"{name} must be >= 1, got {getattr(config, name)}", path="train config")
    if config.select_best and (config.save_every == 0) != (config.eval_every == 0):
        raise GdrtError("select_best needs eval_every and save_every both per epoch (0) or both in steps",
                        path="train config", hint="e.g. --set eval_every=0 --set save_every=0")
    if config.select_best and config.save_every and config.eval_every and config.save_every % config.eval_every:
        raise GdrtError("select_best needs save_every to be a multiple of eval_every", path="train config")


def run(config: TrainConfig) -> dict[str, Any] | None:
    """Train and write the Model artifact; returns its manifest (None in a non-zero rank)."""
    from gdrt_core.tracking import check_reachable, is_rank_zero, tracking_enabled, tracking_uri
    from gdrt_core.train.deepspeed import needs_launch, relaunch_under_torchrun

    validate(config)
    if tracking_enabled() and is_rank_zero():
        check_reachable(tracking_uri())  # fail before any training, naming the URI
    if needs_launch(config.num_gpus, config.deepspeed):
        import tempfile

        import yaml

        from gdrt_core.artifacts import read_manifest

        Path(config.out).absolute().parent.mkdir(parents=True, exist_ok=True)
        fd, cfg_path = tempfile.mkstemp(prefix=".gdrt-train-", suffix=".yaml", dir=Path(config.out).absolute().parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
        try:
            relaunch_under_torchrun(config.num_gpus, [
                "train", "--dataset", config.dataset, "--model", config.model, "--out", config.out,
                "--config", cfg_path,
            ])
        finally:
            os.unlink(cfg_path)
        return read_manifest(config.out, "model", verify=False)
    from gdrt_core.train.loop import finish_distributed, train

    try:
        result = train(config)
    except BaseException:
        finish_distributed(wait=False)
        raise
    finish_distributed(wait=True)
    return result


def cli(args: argparse.Namespace) -> None:
    cfg = load_config(
        TrainConfig, args.config, args.overrides, dataset=args.dataset, model=args.model, out=args.out,
        objective=args.objective, groups=args.groups, num_gpus=args.num_gpus, deepspeed=args.deepspeed,
    )
    manifest = run(cfg)
    if manifest is not None:
        m = manifest.get("metrics", {})
        print(f"trained {cfg.objective} -> {cfg.out}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
