"""Test-only fault injection, in one place, switched by one environment variable.

    PIPELINE_FAULT=generate.shard:3   # SIGKILL the process right after it wrote its 3rd new generate shard
    PIPELINE_FAULT=train.step:3       # every rank SIGKILLs itself once training step 3 is logged

The crash tests (tests/e2e/test_crash_safety.py, tests/e2e/test_distributed.py) set it on a real subprocess and
check that the same command, run again, finishes without losing or repeating work. Unset, nothing here acts.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

from transformers import TrainerCallback

ENV = "PIPELINE_FAULT"
POINTS = ("generate.shard", "train.step")
_reached: Counter = Counter()  # how often each point was reached in this process


def planned() -> tuple[str, int] | None:
    """(point, n) from PIPELINE_FAULT, or None when no fault is set."""
    value = os.environ.get(ENV, "")
    if not value:
        return None
    point, _, n = value.rpartition(":")
    if point not in POINTS or not n.isdigit():
        raise ValueError(f"{ENV}={value!r}. Fix: use <point>:<n> with a point of {', '.join(POINTS)}, e.g. generate.shard:3.")
    return point, int(n)


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: what a power cut or the OOM killer does


def reached(point: str) -> None:
    """Count one more arrival at `point`; SIGKILL this process when it is the planned fault's n-th."""
    fault = planned()
    if fault is None or fault[0] != point:
        return
    _reached[point] += 1
    if _reached[point] == fault[1]:
        kill()


class KillAtStep(TrainerCallback):
    """`train.step:N`: every rank SIGKILLs itself once step N is logged (all ranks die, as when a node is lost)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step >= self.step:
            kill()


def train_callbacks() -> list[TrainerCallback]:
    """The Trainer callbacks the planned fault needs (none when no `train.step` fault is set)."""
    fault = planned()
    return [KillAtStep(fault[1])] if fault and fault[0] == "train.step" else []
