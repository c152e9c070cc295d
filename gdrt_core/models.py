"""Loading causal LMs and tokenizers (hub id or local dir), LoRA adapters, and saving them back.

One place decides how every stage loads a model, so that training, grouping, attribution, evaluation and
recommendation see the same weights, dtype and tokenizer settings:

- any causal LM by hub id or local path, safetensors weights only (no pickle), `trust_remote_code` off
  unless the config turns it on;
- dtype `auto` = float32 on CPU, bfloat16 on a GPU that supports it;
- a saved PEFT adapter directory (adapter_config.json + adapter_model.safetensors) loads transparently:
  its base model is loaded from the reference in adapter_config.json and the adapter applied on top;
- LoRA (peft) with r=8, alpha=16, dropout 0.05 on q_proj/v_proj by default (any layer peft adapts: Linear,
  transformers' Conv1D of the GPT-2 family, Embedding, Conv; `auto` = peft's default for the architecture),
  or full fine-tuning.

torch, transformers and peft are imported inside the functions: `import gdrt_core.models` stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdrt_core.config import field
from gdrt_core.errors import GdrtError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelConfig:
    """How a stage loads and fine-tunes its model (the `model` section of a stage config)."""

    dtype: str = field("auto", help="auto (float32 on CPU, bfloat16 on a GPU) | float32 | bfloat16 | float16")
    device: str = field(
        "auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N | none (leave on CPU for a launcher)"
    )
    trust_remote_code: bool = field(False, help="run modelling code shipped with a hub model (only if you trust it)")
    padding_side: str = field("right", help="tokenizer padding side: right (training) | left (generation)")
    lora: bool = field(False, help="train LoRA adapters (peft) instead of every weight (full fine-tuning)")
    lora_r: int = field(8, help="LoRA rank")
    lora_alpha: int = field(16, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = field(0.05, help="dropout on the LoRA branch input")
    lora_target_modules: list[str] = field(
        ["q_proj", "v_proj"],
        help="module names (last path component) that get adapters: Linear, Conv1D (GPT-2), Embedding or Conv "
        "layers; auto = peft's default for the architecture",
    )


# ----------------------------------------------------------------------------------------------- resolving


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(device: str = "auto") -> str | None:
    """The torch device string to move the model to, or None to leave it where it was loaded (CPU)."""
    if device == "none":
        return None
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise GdrtError(f"device {device!r} was asked for but no CUDA device is available", hint="use device: cpu")
    return device


def resolve_dtype(dtype: str = "auto", device: str | None = "cpu"):
    """torch dtype for `dtype` on `device`: auto = float32 on CPU, bfloat16 on a GPU that supports it.

    device None (a launcher places the model) counts as a GPU when one is visible.
    """
    import torch

    if dtype not in DTYPES:
        raise GdrtError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        on_gpu = torch.cuda.is_available() if device is None else device.startswith("cuda")
        if on_gpu and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def _looks_local(id_or_dir: str) -> bool:
    """A path (existing, or written like one) rather than a hub id such as `org/name` or `gpt2`."""
    s = str(id_or_dir)
    return (
        Path(s).expanduser().exists()
        or s.startswith(("/", ".", "~"))
        or s.count("/") > 1
        or (os.sep != "/" and os.sep in s)
    )


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a saved PEFT adapter directory (adapter_config.json present)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter directory refers to (a hub id or an existing local path).

    A relative local reference is tried against the adapter directory, then the working directory.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    try:
        ref = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise GdrtError(f"cannot read the adapter config ({e})", path=str(cfg_path)) from None
    if not ref:
        raise GdrtError(
            "the adapter does not name its base model (base_model_name_or_path is empty)", path=str(cfg_path),
            hint="set base_model_name_or_path to the base model's hub id or directory",
        )
    ref_path = Path(str(ref)).expanduser()
    if ref_path.is_absolute():
        if not ref_path.exists():
            raise GdrtError(
                f"the adapter's base model directory {ref} does not exist", path=str(cfg_path),
                hint="restore the base model there, or edit base_model_name_or_path",
            )
        return str(ref_path)
    for candidate in (adapter_dir / ref_path, ref_path):
        if candidate.exists():
            return str(candidate.resolve())
    if _looks_local(str(ref)):
        raise GdrtError(
            f"the adapter's base model {ref} is neither a directory (relative to the adapter or the working "
            "directory) nor a hub id", path=str(cfg_path), hint="edit base_model_name_or_path",
        )
    return str(ref)


def _check_local_model_dir(path: Path) -> None:
    """Clear errors for a local model directory that from_pretrained would reject obscurely; a gdrt Model
    artifact's files must match their sha256 in its manifest, and every safetensors file must be whole."""
    if not path.exists():
        raise GdrtError(
            "model directory does not exist", path=str(path),
            hint="pass an existing model directory or a hub id such as Qwen/Qwen2-0.5B",
        )
    if not path.is_dir():
        raise GdrtError("expected a model directory, found a file", path=str(path))
    if is_adapter_dir(path):
        if not (path / ADAPTER_WEIGHTS).is_file():
            found = sorted(p.name for p in path.glob("adapter_model.*"))
            raise GdrtError(
                f"the adapter directory has no {ADAPTER_WEIGHTS}" + (f" (found {', '.join(found)})" if found else ""),
                path=str(path), hint="only safetensors weights are loaded; re-save the adapter with safetensors",
            )
        _check_model_files(path)
        return
    if not (path / "config.json").is_file():
        raise GdrtError(
            "not a Hugging Face model directory: config.json is missing", path=str(path),
            hint="point --model at a directory written by save_pretrained (or gdrt init-model / gdrt train)",
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise GdrtError(
            "the model directory has no *.safetensors weights"
            + (f" (found {', '.join(pickled)}: pickle files are not loaded)" if pickled else ""),
            path=str(path),
            hint="convert it: load it once with transformers and save_pretrained(dir, safe_serialization=True)",
        )
    _check_model_files(path)


def check_model_source(id_or_dir: str | os.PathLike, *, trust_remote_code: bool = False) -> None:
    """What `load_model_and_tokenizer` would refuse, found without loading the weights: a local model
    directory (or adapter directory, and its base model) that is missing, incomplete or changed since its
    manifest; a config.json transformers cannot read; no usable tokenizer; a hub id that cannot be resolved
    (offline and not cached). GdrtError naming the model otherwise."""
    from transformers import AutoConfig

    source = str(id_or_dir)
    config_source = source
    if _looks_local(source):
        path = Path(source).expanduser()
        _check_local_model_dir(path)
        config_source = str(path)
        if is_adapter_dir(path):
            config_source = adapter_base(path)
            if _looks_local(config_source):
                _check_local_model_dir(Path(config_source))
    try:
        AutoConfig.from_pretrained(config_source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if _looks_local(config_source):
            raise GdrtError(f"cannot read the model's config.json ({str(e).strip().splitlines()[0]})",
                            path=config_source) from None
        raise _hub_error("model", config_source, e, trust_remote_code) from None
    load_tokenizer(source, trust_remote_code=trust_remote_code)


def _check_model_files(path: Path) -> None:
    """A gdrt Model artifact's files match their sha256 in its manifest; every safetensors file is whole."""
    from gdrt_core.artifacts import MANIFEST, safetensors_problem, verify_files

    if (path / MANIFEST).is_file():
        verify_files(path)
    for weights in sorted(path.glob("*.safetensors")):
        if (problem := safetensors_problem(weights)) is not None:
            raise GdrtError(f"the weights file is {problem}", path=str(weights), hint="copy or re-create the model")


def _hub_error(what: str, id_or_dir: str, err: Exception, trust_remote_code: bool) -> GdrtError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "trust_remote_code" in str(err) and not trust_remote_code:
        return GdrtError(
            f"{what} {id_or_dir!r} needs its own modelling code ({text})",
            hint="set trust_remote_code: true in the model settings if you trust this repository",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = (
        "HF_HUB_OFFLINE is set: download it beforehand (huggingface-cli download) or pass a local directory"
        if offline else "check the hub id, network access and access rights, or pass a local directory"
    )
    return GdrtError(f"cannot load {what} {id_or_dir!r} from the Hugging Face hub: {text}", hint=hint)


# ---------------------------------------------------------------------------------------------- tokenizers


def load_tokenizer(id_or_dir: str | os.PathLike, *, padding_side: str = "right", trust_remote_code: bool = False):
    """A fast tokenizer (offset mappings are required for token roles) with a pad token.

    A missing pad token becomes EOS (or UNK when there is no EOS): labels are built from token roles, not
    from pad ids, so sharing the id is harmless. An adapter directory without tokenizer files uses its
    base model's tokenizer.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise GdrtError(f"padding_side must be left or right, got {padding_side!r}")
    source = str(id_or_dir)
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            _check_local_model_dir(path)  # raises: missing, or a file
        has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
        if is_adapter_dir(path) and not has_tokenizer:
            source = adapter_base(path)
        elif not has_tokenizer:
            raise GdrtError(
                f"no tokenizer files in the model directory (expected one of {', '.join(TOKENIZER_FILES)})",
                path=str(path), hint="save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
            )
        else:
            source = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if _looks_local(source):
            raise GdrtError(f"cannot load a tokenizer from this directory ({e})", path=source) from None
        raise _hub_error("tokenizer", source, e, trust_remote_code) from None
    if not getattr(tokenizer, "is_fast", False):
        raise GdrtError(
            f"the tokenizer of {source!r} is not a fast tokenizer (no offset mapping for token roles)",
            hint="provide a tokenizer.json (convert it with the `tokenizers` library)",
        )
    ensure_pad_token(tokenizer, source)
    tokenizer.padding_side = padding_side
    return tokenizer


def ensure_pad_token(tokenizer, source: str) -> None:
    """Give `tokenizer` a pad token when it has none: EOS, else UNK.

    Sharing the id with EOS is correct here because no code reads pad ids: attention masks and position ids
    come from sequence lengths (left padding for generation, right padding for training), and labels come
    from token roles, so the EOS that ends every response stays a target (tests/unit/test_pretrained.py
    checks both with SmolLM2, whose pad token is its EOS `<|im_end|>`).
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise GdrtError(
            f"the tokenizer of {source!r} has no pad, EOS or UNK token to pad with",
            hint="add a pad token to the tokenizer and resize the model's embeddings",
        )


# -------------------------------------------------------------------------------------------------- models


def _from_pretrained(source: str, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    local = _looks_local(source)
    if local:
        _check_local_model_dir(Path(source).expanduser())
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        if local:
            raise GdrtError(f"cannot load the model from this directory ({e})", path=source) from None
        raise _hub_error("model", source, e, trust_remote_code) from None


def load_model(
    id_or_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    trainable_adapter: bool = False,
):
    """Any causal LM by hub id or local path, safetensors only; an adapter dir loads base + adapter.

    merge_adapter=True folds a loaded adapter into the base weights (faster inference, plain model out);
    trainable_adapter=True keeps the adapter's weights trainable (continued fine-tuning).
    The model is returned in eval mode on the resolved device.
    """
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    source = str(id_or_dir)
    path = Path(source).expanduser()
    if _looks_local(source) and path.is_dir() and is_adapter_dir(path):
        _check_local_model_dir(path)
        from peft import PeftModel

        base = _from_pretrained(adapter_base(path), torch_dtype, trust_remote_code)
        with _peft_wrap_quietly():
            model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    else:
        model = _from_pretrained(str(path) if _looks_local(source) else source, torch_dtype, trust_remote_code)
    if target_device is not None:
        model.to(target_device)
    model.eval()
    return model


def load_model_and_tokenizer(id_or_dir: str | os.PathLike, config: ModelConfig | None = None, **load_kw: Any):
    """(model, tokenizer) with the settings of `config` (defaults when None)."""
    config = config or ModelConfig()
    tokenizer = load_tokenizer(id_or_dir, padding_side=config.padding_side, trust_remote_code=config.trust_remote_code)
    model = load_model(
        id_or_dir, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code, **load_kw
    )
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- LoRA


AUTO_TARGETS = "auto"


def _lora_layer_types() -> tuple:
    """Layer classes peft's LoRA adapts (its default dispatcher): Linear, transformers' Conv1D (the GPT-2
    family's projections), Embedding and convolutions."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def lora_module_names(model) -> list[str]:
    """Distinct last path components of the layers LoRA can target (`_lora_layer_types`)."""
    types = _lora_layer_types()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, types)})


def _architecture_targets(model) -> list[str] | None:
    """peft's default LoRA targets for the model's architecture (gpt2: c_attn; llama: q_proj, v_proj)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return sorted(targets) if targets else None


def apply_lora(
    model,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
):
    """Wrap `model` with fresh LoRA adapters; only the adapter weights require grad afterwards.

    Targets are last path components of any layer peft adapts (`lora_module_names`); `["auto"]` takes
    peft's default targets for the architecture.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    available = lora_module_names(model)
    suggested = _architecture_targets(model)
    suggestion = f"; peft's default for this architecture: {', '.join(suggested)}" if suggested else ""
    if list(target_modules) == [AUTO_TARGETS]:
        if suggested is None:
            raise GdrtError(
                f"lora_target_modules=auto: peft has no default LoRA targets for {type(model).__name__}",
                hint=f"set lora_target_modules to some of: {', '.join(available)}",
            )
        target_modules = suggested
    missing = sorted(set(target_modules) - set(available))
    if missing:
        raise GdrtError(
            f"LoRA target module(s) {', '.join(missing)} do not exist in {type(model).__name__}",
            hint=f"set lora_target_modules to some of: {', '.join(available)}{suggestion}",
        )
    if r <= 0:
        raise GdrtError(f"lora_r must be a positive integer, got {r}")
    from transformers.pytorch_utils import Conv1D

    wanted = set(target_modules)
    targeted = [m for name, m in model.named_modules()
                if name.rsplit(".", 1)[-1] in wanted and isinstance(m, _lora_layer_types())]
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=list(target_modules), bias="none",
        # Conv1D stores its weight as [in, out]: peft needs fan_in_fan_out for it (and sets it itself, warning)
        fan_in_fan_out=bool(targeted) and all(isinstance(m, Conv1D) for m in targeted),
    )
    with _peft_wrap_quietly():
        return get_peft_model(model, lora)


@contextlib.contextmanager
def _peft_wrap_quietly():
    """peft 0.21 reads `model.is_gradient_checkpointing` when it wraps a model, which transformers 5 deprecated
    (a FutureWarning on every train, attribute and register run, about peft's code, not the user's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def merge_lora(model):
    """Fold LoRA adapters into the base weights and return the plain base model (no peft wrapper)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload()


def prepare_for_training(model, config: ModelConfig):
    """LoRA adapters when `config.lora`, otherwise every weight trainable (full fine-tuning)."""
    model.train()
    if config.lora:
        if hasattr(model, "peft_config"):  # a loaded adapter keeps training
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            return model
        return apply_lora(
            model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    model = merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, base_ref: str | None = None) -> list[str]:
    """Save a plain model (full weights) or a PEFT model (adapter + base reference), with the tokenizer.

    For an adapter, `base_ref` (hub id or directory) is written as base_model_name_or_path; a local
    reference is made absolute so the adapter loads from any working directory. Returns the file names.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        for cfg in model.peft_config.values():
            ref = base_ref or cfg.base_model_name_or_path
            if ref and _looks_local(ref) and Path(ref).expanduser().exists():
                ref = str(Path(ref).expanduser().resolve())
            cfg.base_model_name_or_path = ref
        model.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
