"""Helpers shared by the train tests: a tiny model, a Groups-shaped artifact, one-step parameter updates.

Also a torchrun worker: `python -m torch.distributed.run --nproc_per_node 2 tests/integration/test_train_support.py
update MODEL DATASET GROUPS BATCH ACCUM POLICY OUT.pt [DEEPSPEED OBJECTIVE STEPS N_EXAMPLES]` writes the
parameters after a short run (rank 0).
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NUM_GROUPS = 4


def make_tiny_model(dataset_dir: Path, out: Path) -> Path:
    from gdrt_core.embedded import EmbeddedConfig, run

    run(EmbeddedConfig(dataset=str(dataset_dir), out=str(out), size="tiny", seed=0))
    return out


def hashed_group(token_id: int) -> int:
    """A stand-in group id: a stable hash of the token id (the grouping stage is not needed here)."""
    return zlib.crc32(str(token_id).encode()) % NUM_GROUPS


def make_groups(dataset_dir: Path, model_dir: Path, out: Path, limit: int | None = None) -> Path:
    """A Groups-shaped artifact (token_groups.parquet, groups.json, manifest) with hashed group ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_output_dir, write_json_atomic, write_manifest
    from gdrt_core.dataset import Dataset
    from gdrt_core.models import load_tokenizer
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import IGNORE_INDEX, tokenize_example

    ds = Dataset(dataset_dir)
    tok = load_tokenizer(str(model_dir))
    rows: dict[str, list] = {k: [] for k in ("example_id", "position", "token_id", "relevance", "group", "split")}
    for split in ("train", "valid"):
        for ex in ds.examples(split, limit):
            t = tokenize_example(tok, render(ds.domain, list(ex.history_titles), ex.target_title))
            targets = [label for label in t.labels if label != IGNORE_INDEX]
            for pos, token_id in enumerate(targets):
                rows["example_id"].append(ex.example_id)
                rows["position"].append(pos)
                rows["token_id"].append(token_id)
                rows["relevance"].append(-float(pos))
                rows["group"].append(hashed_group(token_id))
                rows["split"].append(split)
    table = pa.table({
        "example_id": pa.array(rows["example_id"], pa.int64()), "position": pa.array(rows["position"], pa.int32()),
        "token_id": pa.array(rows["token_id"], pa.int32()), "relevance": pa.array(rows["relevance"], pa.float32()),
        "group": pa.array(rows["group"], pa.int8()), "split": pa.array(rows["split"], pa.string()),
    })
    with atomic_output_dir(out) as tmp:
        pq.write_table(table, tmp / "token_groups.parquet")
        sizes = [int(sum(1 for g in rows["group"] if g == k)) for k in range(NUM_GROUPS)]
        write_json_atomic(tmp / "groups.json", {"edges": [-3.0, -2.0, -1.0], "sizes": sizes, "num_groups": NUM_GROUPS})
        write_manifest(tmp, "groups", config={"num_groups": NUM_GROUPS}, inputs={"dataset": dataset_dir})
    return out


def short_run_params(model_dir: str, dataset_dir: str, groups_dir: str | None, *, batch: int, accum: int,
                     policy: str, steps: int = 2, n_examples: int = 16, objective: str = "gdrt", tau: float = 1.0,
                     work_dir: str, deepspeed: str | None = None):
    """Parameters (flattened, float64) after `steps` SGD steps of full fine-tuning through GdrtTrainer.

    SGD with lr 1 makes the update equal to the gradient (Adam would hide a wrong scale behind its
    normalisation); no dropout in the tiny Llama, so every split sees the same function.
    """
    import torch
    from transformers import set_seed

    from gdrt_core.dataset import Dataset
    from gdrt_core.models import load_model, load_tokenizer
    from gdrt_core.train import TrainConfig
    from gdrt_core.train.data import StepWeights, TrainCollator, build_features, load_token_groups
    from gdrt_core.train.loop import training_arguments
    from gdrt_core.train.trainer import GdrtTrainer

    torch.set_num_threads(1)
    set_seed(0)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device="none")
    model.train()
    groups = load_token_groups(groups_dir)[0] if groups_dir else None
    feats = build_features(Dataset(dataset_dir), "train", tok, token_groups=groups, limit=n_examples)
    cfg = TrainConfig(
        dataset=dataset_dir, model=model_dir, out=work_dir, objective=objective, groups=groups_dir,
        optim="sgd", lr=1.0, scheduler="constant", max_grad_norm=0.0, max_steps=steps, batch_size=batch,
        grad_accum=accum, eval_every=0, save_every=0, log_every=1, lora=False, deepspeed=deepspeed, seed=0,
    )
    args = training_arguments(cfg, Path(work_dir), has_valid=False)
    args.save_strategy = "no"
    sw = StepWeights(NUM_GROUPS if objective == "gdrt" else 1, objective=objective, tau=tau, policy=policy)
    trainer = GdrtTrainer(model=model, args=args, train_dataset=feats, data_collator=TrainCollator(tok.pad_token_id),
                          processing_class=tok, step_weights=sw)
    trainer.train()
    if deepspeed == "zero3":

        import deepspeed as ds

        params = list(trainer.model_wrapped.module.parameters())
        with ds.zero.GatheredParameters(params):
            flat = torch.cat([p.detach().double().flatten() for p in params])
    else:
        flat = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return flat, logs


def _worker(argv: list[str]) -> None:
    import torch

    model, dataset, groups, batch, accum, policy, out = argv[:7]
    deepspeed = argv[7] if len(argv) > 7 and argv[7] != "none" else None
    objective = argv[8] if len(argv) > 8 else "gdrt"
    steps = int(argv[9]) if len(argv) > 9 else 2
    n_examples = int(argv[10]) if len(argv) > 10 else 16
    flat, logs = short_run_params(model, dataset, None if groups == "none" else groups, batch=int(batch),
                                  accum=int(accum), policy=policy, work_dir=out + ".work", deepspeed=deepspeed,
                                  objective=objective, steps=steps, n_examples=n_examples)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"params": flat, "logs": logs}, out)
    from gdrt_core.train.loop import finish_distributed

    finish_distributed(wait=True)  # as `gdrt train` does: a worker exiting with its group alive can abort


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "update":
    _worker(sys.argv[2:])
