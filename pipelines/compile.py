"""Compile the pipelines to YAML for the KFP UI: `python pipelines/compile.py [--out-dir DIR]`.

Writes gdrt_pipeline.yaml (one GPU node, DeepSpeed inside the train step) and gdrt_pipeline_multinode.yaml
(training submitted as a Kubeflow Trainer TrainJob), both or neither: a file that cannot be written leaves the
directory as it was. The output is deterministic: same code and environment, same bytes. The image comes from
GDRT_IMAGE (components/image.py; an empty one is refused).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PIPELINE_FILES = ("gdrt_pipeline.yaml", "gdrt_pipeline_multinode.yaml")


def compile_all(out_dir: str | Path) -> list[Path]:
    from components.image import image_from_env
    from gdrt_core.artifacts import check_path_given

    check_path_given(out_dir, "--out-dir", "the directory to write the compiled pipelines to")
    image_from_env()  # a blank GDRT_IMAGE is refused before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # a path of the wrong kind fails here, before kfp is imported
    from kfp import compiler

    from gdrt_core.artifacts import atomic_files
    from pipelines import resources
    from pipelines.gdrt_pipeline import build_pipeline
    from pipelines.gdrt_pipeline_multinode import build_multinode_pipeline

    pipelines = (build_pipeline(cluster=True, checkpoint_pvc=resources.CACHE_PVC), build_multinode_pipeline())
    written = [out_dir / name for name in PIPELINE_FILES]
    with atomic_files(written) as temporaries:  # .yaml temporaries: kfp picks the format by the suffix
        for pipeline, tmp in zip(pipelines, temporaries, strict=True):
            compiler.Compiler().compile(pipeline, str(tmp))
    return written


def build_parser() -> argparse.ArgumentParser:
    from gdrt_core.cli import user_path

    parser = argparse.ArgumentParser(prog="pipelines/compile.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=user_path, default=str(ROOT / "pipelines" / "compiled"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from gdrt_core.cli import report_errors

    parser = build_parser()
    args = parser.parse_args(argv)

    def compile_and_list() -> None:
        for path in compile_all(args.out_dir):
            print(f"wrote {path}")

    return report_errors(parser.prog, compile_and_list)


if __name__ == "__main__":
    sys.exit(main())
