"""What a user sees while stages run: progress bars when someone is watching, one summary line per stage.

Bars (tqdm: rate and time left) are on when stderr is a terminal and off in CI, logs and tests;
`progress=true|false` on the command line forces them either way. Every stage then prints one line:
what it did, where it wrote, how long it took.

    python -m pipeline experiment=demo progress=false     # no bars, just the summary lines
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import datasets
from tqdm.auto import tqdm as _tqdm
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging

from pipeline.runtime.outputs import MANIFEST, read_manifest

_forced: bool | None = None  # None: decide by whether stderr is a terminal


def configure(progress: bool | None) -> None:
    """Set from the `progress` config field (None = automatic)."""
    global _forced
    _forced = progress
    # The libraries' own bars (weight loading, dataset filters) follow the same switch.
    if enabled():
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()


def enabled() -> bool:
    return sys.stderr.isatty() if _forced is None else bool(_forced)


def tqdm(*args, **kwargs):
    """`tqdm.auto.tqdm`, switched off unless bars are enabled (a drop-in for the stages' loops)."""
    kwargs["disable"] = kwargs.get("disable", False) or not enabled()  # a caller's own reason to hide it still counts
    return _tqdm(*args, **kwargs)


class LossProgressCallback(ProgressCallback):
    """The Trainer's bar (steps, rate, time left) with the latest loss shown on the bar itself."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        super().on_log(args, state, control, logs=logs, **kwargs)


def attach(trainer) -> None:
    """Swap the Trainer's default progress bar for the one that shows the loss (no-op when bars are off)."""
    if enabled() and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossProgressCallback())


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _what(stage: str, manifest: dict) -> str:
    """What a stage did, from the facts its manifest records."""
    get = manifest.get
    if stage == "generate" and "counts" in manifest:
        c = manifest["counts"]  # "<split> <tag set>" -> count
        train = sum(n for k, n in c.items() if k.startswith("train"))
        heldout = sum(n for k, n in c.items() if k.startswith("heldout"))
        return f"{train} train + {heldout} held-out teacher samples, {get('generated_tokens', '?')} tokens"
    if stage == "extend" and "tag_ids" in manifest:
        return "added " + ", ".join(f"{tag} (id {i})" for tag, i in manifest["tag_ids"].items())
    if stage == "train" and "steps" in manifest:
        return f"{manifest['steps']} steps on {get('examples', '?')} examples, mean loss {get('final_loss', float('nan')):.4f}"
    if stage == "evaluate" and "metrics" in manifest:
        m, sets = manifest["metrics"], manifest.get("sets") or []
        each = f" over {len(sets)} sets [" + ", ".join(f"{''.join(s['tags'])} {s['recovery']:.3f}" for s in sets) + "]" if len(sets) > 1 else ""
        return (
            f"recovery {m['recovery']:.3f}{each} (untrained tag {m.get('init_recovery', float('nan')):.3f}), "
            f"drift {m.get('drift_kl', float('nan')):.5f}, {m.get('prompt_tokens_saved', '?')} prompt tokens saved"
        )
    return "done"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summary_line(stage: str, out_dir: Path, seconds: float, started: float) -> str:
    """One line: `stage: what it did in 1m02s -> folder`, or that it reused a finished folder."""
    manifest_file = Path(out_dir) / MANIFEST
    if not manifest_file.is_file():
        return f"{stage}: no output written ({duration(seconds)})"
    what = _what(stage, read_manifest(Path(out_dir)))
    target = Path(out_dir) / "report.html" if (Path(out_dir) / "report.html").is_file() else Path(out_dir)
    if manifest_file.stat().st_mtime < started:
        return f"{stage}: reused the finished output ({what}) -> {_shown(target)}"
    return f"{stage}: {what} in {duration(seconds)} -> {_shown(target)}"


def run_with_summary(stage: str, run, *args) -> Path:
    """`run(stage, *args)`, one stage, then its summary line (stdout, so it shows in logs without a terminal)."""
    started = time.time()
    out_dir = run(stage, *args)
    print(summary_line(stage, out_dir, time.time() - started, started), flush=True)
    return out_dir
