"""Stage outputs on disk: one folder per (stage, config) with a manifest, written atomically.

A stage's folder is named by a hash of everything that determines its result (its own config, the
model, the prompt text and the upstream stages' keys). So re-running a finished stage with the same
config finds its folder and does nothing, and a changed config gets a new folder instead of
overwriting a different result. Work happens in `.<name>.partial` and is renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import datasets
import peft
import torch
import transformers
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT
from pipeline.errors import ConfigError
from pipeline.runtime.distributed import is_main

MANIFEST = "manifest.json"


def plain(node) -> dict:
    """A config node as plain Python values (for hashing and manifests)."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else dict(node)


def file_sha(path: str | Path) -> str:
    """Content hash: a stage keyed on a file's bytes, not its path, is the same on every checkout."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if Path(path).is_file() else f"missing:{path}"


MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "tokenizer_config.json")  # what a model is


def _hash_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metatoken-pipeline" / "file-hashes.json"


def cached_file_sha(path: Path, cache: dict) -> str:
    """A file's content hash, reused while its path, size and mtime are unchanged (weights are large)."""
    stat = path.stat()
    entry = cache.get(str(path.resolve()))
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["sha"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha": digest.hexdigest()}
    return digest.hexdigest()


def model_content(path: str | Path) -> str | None:
    """One hash of a local model folder's config, tokenizer and weight files (None for a hub id: no network here).

    Replacing the weights at the same path gives a new hash, so no stage reuses results of the old model.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    digests = {f.name: cached_file_sha(f, cache) for f in files}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, cache)
    except OSError:  # a read-only home: hash again next time
        pass
    return key_hash(digests) if digests else None


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def model_key(model_cfg) -> dict:
    """What identifies the base model: its source (package or id/path relative to the project), its format, and
    its content (files' hash; for the default model also the version of the package its GGUF file comes from)."""
    source = model_cfg.gguf_package or str(model_cfg.path).replace(str(PROJECT_ROOT), ".")
    key = {"source": source, "chat": model_cfg.chat, "dtype": model_cfg.dtype, "content": model_content(model_cfg.path)}
    if model_cfg.gguf_package:
        key["package_version"] = package_version(model_cfg.gguf_package)
    return key


def bootstrap_key(gen_cfg) -> dict:
    """A bootstrap teacher (a trained output) by its path and its files' content."""
    return {"path": gen_cfg.bootstrap_model, "content": model_content(gen_cfg.bootstrap_model or "")}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def stage_dir(outputs: str | Path, stage: str, label: str, key: dict) -> Path:
    return Path(outputs) / stage / f"{label}-{key_hash(key)}"


def is_complete(out_dir: Path) -> bool:
    return (out_dir / MANIFEST).is_file()


def already_done(out_dir: Path, force: bool, stage: str) -> bool:
    """A finished folder for this exact config exists: the stage has nothing to do (unless forced)."""
    if is_complete(out_dir) and not force:
        logging.getLogger(f"pipeline.stages.{stage}").info("%s: %s is complete, nothing to do", stage, out_dir)
        return True
    return False


def require(needed: dict[str, Path], by: str) -> None:
    """Fail with the command to run when an upstream stage's output for this config is missing."""
    for stage, folder in needed.items():
        if not is_complete(folder):
            raise FileNotFoundError(
                f"{by} needs the {stage} output {folder}. Fix: run `python -m pipeline stage={stage}` with the same "
                f"config first (or stage=all)."
            )


def lock_path(out_dir: Path) -> Path:
    """`<outputs>/.locks/<stage>/<name>.lock`: beside the stage folders, not among them."""
    return out_dir.parent.parent / ".locks" / out_dir.parent.name / f"{out_dir.name}.lock"


def _owner_path(out_dir: Path) -> Path:
    return lock_path(out_dir).with_suffix(".owner")


@contextmanager
def stage_lock(out_dir: Path, stage: str):
    """Hold the lock of one stage output: a second run of the same stage and config waits for the first
    (then finds its result and does nothing) instead of failing inside the other's `.partial` folder.

    While it waits it says which process holds the lock (pid, host, since when).
    """
    lock_path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(out_dir)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = _owner_path(out_dir)
        holder = owner.read_text().strip() if owner.is_file() else "another process"
        logging.getLogger(f"pipeline.stages.{stage}").warning(
            "%s: %s is being written by %s; waiting for it to finish (Ctrl-C to stop waiting)", stage, out_dir, holder
        )
        lock.acquire()
    try:
        _owner_path(out_dir).write_text(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        yield
    finally:
        _owner_path(out_dir).unlink(missing_ok=True)
        lock.release()


def is_locked(out_dir: Path) -> bool:
    """Whether a running process holds this output's lock (so its `.partial` folder is not stale)."""
    if not lock_path(out_dir).exists():
        return False
    lock = FileLock(str(lock_path(out_dir)))
    try:
        lock.acquire(timeout=0)
    except (Timeout, RuntimeError):  # RuntimeError: held in this very thread (filelock's deadlock guard)
        return True
    lock.release()
    return False


def stale_partials(outputs: str | Path) -> list[Path]:
    """`.partial` work folders under `outputs/<stage>/` that no running process holds: crashed or killed runs.

    A stage that can resume (generate, train) picks its own up again when re-run with the same config.
    """
    found = []
    for partial in sorted(Path(outputs).glob("*/.*.partial")):
        out_dir = partial.with_name(partial.name[1 : -len(".partial")])
        if partial.is_dir() and not is_locked(out_dir):
            found.append(partial)
    return found


def check_writable(outputs: str | Path) -> None:
    """The outputs folder can be created and written (checked before any model loads)."""
    outputs = Path(outputs)
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outputs, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"paths.outputs: cannot write to {outputs} ({err.strerror or err}). Fix: point paths.outputs to a "
            f"writable folder, e.g. paths.outputs=/tmp/outputs."
        ) from None


def read_manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / MANIFEST).read_text())


def train_manifest(folder: str | Path, by: str) -> dict:
    """A finished train output's manifest; a clear error (for command `by`) when the folder is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{by}: {folder} is not a folder. Fix: give a finished train output, e.g. outputs/train/<tag>-<hash>.")
    if not is_complete(folder):
        raise ConfigError(
            f"{by}: {folder} has no {MANIFEST}, so it is not a finished train output (or it is still running). "
            "Fix: give a folder under outputs/train/ that `python -m pipeline stage=train` completed."
        )
    manifest = read_manifest(folder)
    if manifest.get("stage") != "train":
        raise ConfigError(f"{by}: {folder} is a {manifest.get('stage')!r} output, not a trained model. Fix: give a folder under outputs/train/.")
    return manifest


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (see write_text)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "peft": peft.__version__,
    }


@contextmanager
def atomic_stage_dir(out_dir: Path, stage: str, key: dict, keep_partial: bool = False, shared: bool = False, config=None):
    """Yield a work folder and a manifest dict; on success write the manifest and move it into place.

    The manifest records the key (what the folder name hashes) and, given `config`, the whole resolved
    config the stage ran with, so a later job (pipeline.port) can re-run it with one thing changed.

    With keep_partial, an interrupted run's work folder is reused (stages that can resume use it).
    Under several ranks rank 0 alone writes the stage folder: the other ranks get a scratch folder
    that is thrown away, or with `shared` the same `.partial` folder (for files every rank writes,
    such as checkpoints); only rank 0 writes the manifest and moves the folder into place.
    """
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    if not is_main():
        if shared:
            partial.mkdir(parents=True, exist_ok=True)
            yield partial, {}
        else:
            with tempfile.TemporaryDirectory(prefix=f"{stage}-rank-scratch-") as scratch:
                yield Path(scratch), {}
        return
    if partial.exists() and not keep_partial:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "key": key, "key_hash": key_hash(key), "versions": versions()}
    if config is not None:
        manifest["config"] = plain(config)
    started = time.time()
    yield partial, manifest
    manifest["seconds"] = round(time.time() - started, 1)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(partial / MANIFEST, manifest)
    if out_dir.exists():  # only with force: the same key, so the same kind of result is replaced
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        partial.rename(out_dir)
        shutil.rmtree(old)
    else:
        partial.rename(out_dir)
