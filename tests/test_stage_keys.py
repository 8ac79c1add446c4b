"""Stage keys name the cached outputs on disk: a change to the config schema must not move them.

The hashes below were computed before the config schema gained Enums, range checks and new fields
(`train.save_total_limit`, ...); every existing config must still find its finished folders.
"""
import pytest

from pipeline import evaluate, extend, generate, outputs, train
from pipeline.job import job_from_config
from tests.conftest import compose

KNOWN = {
    "demo": (["experiment=demo"], {"generate": "ffa949688b", "extend": "eedc0511be", "train": "0965a9483c", "evaluate": "292a4e5582"}),
    "default": ([], {"generate": "68f22be596", "extend": "d2baa1fdac", "train": "1680218575", "evaluate": "9d7da53ebc"}),
    "remix": (["experiment=remix"], {"generate": "9e48cf1ea2", "extend": "c7a0d67bb6", "train": "7abbedc502", "evaluate": "8409f9fbb1"}),
    "nested": (["experiment=nested"], {"generate": "52981d21b7", "extend": "2c4fdfaec7", "train": "9e1d172ce6", "evaluate": "27d2d3d8fb"}),
    "pretrain_demo": (["experiment=pretrain_demo"], {"generate": "2979803466", "extend": "ec02e37a29", "train": "4e27f7d992", "evaluate": "b08f8491b5"}),
    "sft_full": (
        ["train.objective=sft", "train.params=full", "extend.init=random", "mixture.order=sorted"],
        {"generate": "d137b43600", "extend": "8b8945f82c", "train": "d170f13402", "evaluate": "e56cd415f3"},
    ),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_stage_keys_of_existing_configs_do_not_change(name):
    overrides, expected = KNOWN[name]
    cfg = compose(overrides)
    job = job_from_config(cfg)
    got = {m.__name__.rsplit(".", 1)[-1]: outputs.key_hash(m.stage_key(cfg, job)) for m in (generate, extend, train, evaluate)}
    assert got == expected
