"""Stage keys name the cached outputs on disk: a change to the config schema must not move them.

The model enters every key by the hash of its files (which differ between conversions), so these pins
hold the model's content fixed and check the rest of the key: the schema's Enums, range checks and new
fields (`train.save_total_limit`, ...) must not move any existing config's folders.
"""
import pytest

from pipeline import evaluate, extend, generate, outputs, train
from pipeline.job import job_from_config
from tests.conftest import compose

KNOWN = {
    "demo": (["experiment=demo"], {"generate": "296f0b3219", "extend": "42afc11faf", "train": "ea37881157", "evaluate": "20ccd7b014"}),
    "default": ([], {"generate": "4afa5c1d43", "extend": "c8517c2421", "train": "ea24db4e91", "evaluate": "ddc85ec9bf"}),
    "remix": (["experiment=remix"], {"generate": "0dd73205d7", "extend": "3b41cc2b6f", "train": "fd2e31693f", "evaluate": "dffc398da5"}),
    "nested": (["experiment=nested"], {"generate": "45c5186845", "extend": "a168ce45eb", "train": "b8caed8cda", "evaluate": "a9f35d2649"}),
    "pretrain_demo": (["experiment=pretrain_demo"], {"generate": "23a7f62a0d", "extend": "d18a0f76e4", "train": "f03be07d6e", "evaluate": "f2f052a5d1"}),
    "sft_full": (
        ["train.objective=sft", "train.params=full", "extend.init=random", "mixture.order=sorted"],
        {"generate": "f0ecdbf4c0", "extend": "272ef175e8", "train": "9761883628", "evaluate": "47dca6d814"},
    ),
}


@pytest.fixture()
def pinned_model_content(monkeypatch):
    monkeypatch.setattr(outputs, "model_content", lambda path: "pinned-content")
    monkeypatch.setattr(outputs, "package_version", lambda package: "0.1.2")


@pytest.mark.parametrize("name", list(KNOWN))
def test_stage_keys_of_existing_configs_do_not_change(name, pinned_model_content):
    overrides, expected = KNOWN[name]
    cfg = compose(overrides)
    job = job_from_config(cfg)
    got = {m.__name__.rsplit(".", 1)[-1]: outputs.key_hash(m.stage_key(cfg, job)) for m in (generate, extend, train, evaluate)}
    assert got == expected
