"""The curate stage: source data -> Dataset artifact (items + train/valid/test windows + manifest)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from gdrt_core.config import field, load_config, to_dict


@dataclass
class CurateConfig:
    source: str = field(help="source directory (sliding, d3) or raw review file (amazon2014/2018)")
    format: str = field(help="sliding | d3 | amazon2014 | amazon2018")
    out: str = field(help="output Dataset directory")
    domain: str = field("generic", help="prompt wording: office, toys, books, clothing, games, cds, generic")
    max_history: int = field(10, help="longest history kept per window")
    max_train: int | None = field(None, help="sample at most this many training windows (None = all)")
    seed: int = field(42, help="sampling seed")
    on_bad_rows: str = field("error", help="error: stop at the first bad row; drop: skip and count bad rows")
    num_pop_groups: int = field(5, help="equal-size popularity groups of items (fairness metrics)")


def run(config: CurateConfig) -> dict:
    """Curate `config.source` into `config.out`; returns the manifest."""
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.curate.sliding import read_sliding
    from gdrt_core.dataset import write_dataset

    if config.format != "sliding":
        from gdrt_core.errors import GdrtError

        raise GdrtError(f"format {config.format!r} is not supported yet")
    titles, splits, report = read_sliding(config)
    with atomic_output_dir(config.out) as tmp:
        return write_dataset(
            tmp, titles=titles, splits=splits, domain=config.domain, config=to_dict(config),
            recipe={"format": config.format, **report}, num_pop_groups=config.num_pop_groups,
        )


def cli(args: argparse.Namespace) -> None:
    cfg = load_config(
        CurateConfig, args.config, args.overrides, source=args.source, format=args.format, out=args.out,
        domain=args.domain, max_train=args.max_train, seed=args.seed, on_bad_rows=args.on_bad_rows,
    )
    manifest = run(cfg)
    c = manifest["counts"]
    print(f"curated {cfg.source} -> {cfg.out}: {c['items']} items, train {c['train']}, valid {c['valid']}, test {c['test']}")
