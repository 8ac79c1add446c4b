"""Several ranks (GPUs, or CPU processes over gloo): process group, sharding, rank-0-only writes, DeepSpeed.

Launch any stage with `torchrun --nproc_per_node N -m pipeline ...` (or `accelerate launch`, or
`deepspeed --no_local_rank`). Then:
- `setup()` (called before Hydra) joins the process group and agrees on one Hydra run folder, so the
  ranks share it and only rank 0 writes Hydra's files into it;
- generate: every rank samples its own batches (`owns_batch`), `merge_shards` puts them back in the
  order of the inputs, so the records do not depend on the number of ranks;
- extend and evaluate run on rank 0 while the other ranks wait (`on_main`);
- train: HF Trainer runs DDP, or DeepSpeed ZeRO-2/3 when `deepspeed=zero2|zero3`;
- `finish()`: `barrier(); destroy_process_group()` (ZeRO-3 ranks may abort at exit without it).

DeepSpeed is imported only when a config turns it on.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pipeline.errors import ConfigError

STAMP_ENV = "PIPELINE_RUN_STAMP"  # the Hydra run folder's time stamp, the same on every rank


def launched_world_size() -> int:
    """The number of ranks the launcher started (torchrun, accelerate and deepspeed all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else launched_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup() -> None:
    """Join the process group (if launched with several ranks) and pin the Hydra run folder.

    Called before Hydra composes the config: every rank must resolve `hydra.run.dir` to the same folder,
    and only rank 0 may write Hydra's `.hydra/` files and log into it.
    """
    if launched_world_size() <= 1:
        return
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S") if is_main() else None]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[STAMP_ENV] = stamp[0]
    if not is_main():  # the folder is shared: rank 0 alone writes Hydra's config copy and log file
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def run_stamp() -> str:
    """`${run_stamp:}` in conf/config.yaml: the agreed stamp under several ranks, else now."""
    return os.environ.get(STAMP_ENV) or time.strftime("%Y-%m-%d_%H-%M-%S")


def finish() -> None:
    """End of a run: wait for every rank, then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_main(name: str, fn, *args):
    """Run `fn` on rank 0 only; the other ranks wait, and fail too if rank 0 failed."""
    if world_size() <= 1:
        return fn(*args)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args)
        except BaseException as err:  # tell the other ranks before raising, so they do not wait forever
            error = err
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"{name} failed on rank 0 ({status[0]}); see rank 0's log.")
    return result


def owns_batch(batch_index: int) -> bool:
    """Batches go round-robin to the ranks (whole batches, so each is sampled exactly as on one rank)."""
    return batch_index % world_size() == rank()


def merge_shards(results: list) -> list:
    """Every rank holds its own results (None elsewhere); return the merged list on every rank.

    The merge is by index, so the order is the inputs' order whatever the number of ranks; an index
    filled by no rank, or by two, is an error rather than a silently short or doubled dataset.
    """
    if world_size() <= 1:
        return results
    shards: list = [None] * world_size()
    dist.all_gather_object(shards, results)
    merged = [None] * len(results)
    for shard in shards:
        if len(shard) != len(results):
            raise RuntimeError(f"generate: ranks disagree on the number of inputs ({len(shard)} vs {len(results)}).")
        for i, item in enumerate(shard):
            if item is not None:
                if merged[i] is not None:
                    raise RuntimeError(f"generate: input {i} was sampled by two ranks.")
                merged[i] = item
    missing = [i for i, item in enumerate(merged) if item is None]
    if missing:
        raise RuntimeError(f"generate: inputs {missing[:10]} were sampled by no rank.")
    return merged


def device(model_cfg) -> str:
    """This rank's device: `cuda` becomes `cuda:<LOCAL_RANK>` under a multi-GPU launch."""
    if str(model_cfg.device).startswith("cuda") and launched_world_size() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return str(model_cfg.device)


def check_world_size(args) -> None:
    """HF Trainer on CPU without `use_cpu=True` under torchrun runs N independent jobs and exits 0."""
    expected = launched_world_size()
    if args.world_size != expected:
        raise RuntimeError(
            f"train: the launcher started {expected} ranks but the Trainer sees world size {args.world_size}, "
            "so each rank would train alone. Fix: on CPU set model.device=cpu (the Trainer then gets use_cpu=True); "
            "on GPUs launch with torchrun/accelerate/deepspeed so WORLD_SIZE, RANK and LOCAL_RANK are set."
        )


# ---------------------------------------------------------------- DeepSpeed

def deepspeed_config(cfg) -> dict | None:
    """The DeepSpeed config for TrainingArguments (None: plain DDP / one process), validated first."""
    if cfg.get("deepspeed") is None:
        return None
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    where = "deepspeed (conf/deepspeed/*.yaml)"
    if not isinstance(ds, dict) or "zero_optimization" not in ds:
        raise ConfigError(f"{where}: no zero_optimization section. Fix: use deepspeed=zero2 or deepspeed=zero3, or copy one of them.")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{where}: has a '{section}' section, but train passes its own torch.optim AdamW and cosine schedule "
                f"(per-group learning rates; a DeepSpeed optimizer also compiles fused ops). Fix: remove '{section}'."
            )
    if cfg.model.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401  (only now: DeepSpeed is a dependency only when turned on)
    except ImportError as err:
        raise ConfigError(f"{where} is set but DeepSpeed does not import ({err}). Fix: pip install deepspeed==0.19.8, or deepspeed=null.") from None
    return ds


def zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def unsharded():
    """Load a model whole even while a ZeRO-3 config is live (from_pretrained would partition it).

    Used for the frozen reference copy under `train.params=full`: it never enters a DeepSpeed engine,
    so each rank keeps a full copy of it.
    """
    import transformers.integrations.deepspeed as hf_ds

    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def full_params(model):
    """Under ZeRO-3 gather the partitioned weights on every rank for the block (to save the model)."""
    if not zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


# ---------------------------------------------------------------- training logs
