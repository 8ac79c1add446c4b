"""Operations: one lock per stage output, a clear error for an unwritable outputs folder, stale `.partial`
folders listed and removable."""
import logging
import threading
import time

import pytest
from filelock import FileLock

import pipeline.core.models
from pipeline.__main__ import run_stages
from pipeline.cli import ls as list_cmd
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.runtime import outputs
from pipeline.stages import paths


def test_a_second_run_of_the_same_stage_waits_for_the_first_and_says_who_holds_it(tiny_cfg, caplog):
    """Before: two runs of one stage at once wrote into the same .partial folder; one died with FileNotFoundError."""
    cfg = tiny_cfg("stage=generate")
    out = paths.output_dir("generate", cfg, job_from_config(cfg))
    outputs.lock_path(out).parent.mkdir(parents=True)
    holding = threading.Event()

    def hold_for_two_seconds():  # another "run" (a thread: filelock refuses a second lock in the same thread)
        with FileLock(str(outputs.lock_path(out))):
            outputs.lock_path(out).with_suffix(".owner").write_text("pid 4242 on test-host since 2026-01-01T00:00:00\n")
            holding.set()
            time.sleep(2.0)

    threading.Thread(target=hold_for_two_seconds).start()
    assert holding.wait(10)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.generate"):
        run_stages(cfg)
    assert time.monotonic() - started >= 2.0  # it waited for the holder
    assert "is being written by pid 4242 on test-host" in caplog.text
    assert outputs.is_complete(out) and not outputs.is_locked(out)


def test_an_unwritable_outputs_folder_fails_before_any_model_loads(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.core.models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"paths.outputs: cannot write to .*a-file/outputs .*Fix: point paths.outputs"):
        run_stages(tiny_cfg(f"paths.outputs={blocker / 'outputs'}"))


def test_list_shows_stale_partial_folders_and_removes_them_on_request(tmp_path):
    stale = tmp_path / "outputs" / "train" / ".kind-0123456789.partial"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "checkpoints" / "weights.bin").write_bytes(b"x" * 2_000_000)
    running = tmp_path / "outputs" / "generate" / ".kind-abcdefabcd.partial"
    running.mkdir(parents=True)
    held_lock = outputs.lock_path(running.with_name("kind-abcdefabcd"))
    held_lock.parent.mkdir(parents=True)
    held = FileLock(str(held_lock))
    held.acquire()  # a run in progress: its folder is not stale
    try:
        args = ["--outputs", str(tmp_path / "outputs"), "--tokenizer", ""]
        text = list_cmd.main(args)
        assert f"{stale} (2.0 MB)" in text and str(running) not in text and "--remove-stale" in text
        list_cmd.main([*args, "--remove-stale"])
        assert not stale.exists() and running.exists()
        assert "unfinished work folders" not in list_cmd.main(args)
    finally:
        held.release()
