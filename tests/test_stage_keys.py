"""Stage keys of the shipped configs stay what they were: every cached output on disk stays valid.

The hashes below were computed before the config schema gained Enums, range checks and new fields
(issue 14) and before the evaluation work of issue 13 (error bars, probes, train-input recovery, the
review fixes). A new config field must leave them unchanged; the one deliberate change is marked
where it is asserted.
"""
import pytest

from tests.conftest import compose

BOOTSTRAP = ["experiment=nested", "generate.teacher_mode=bootstrap",
             "generate.bootstrap_model=outputs/train/nice+authoritative_tone+pirate-7abbedc502"]
CASES = {
    "default": ([], {"generate": "68f22be596", "extend": "d2baa1fdac", "train": "1680218575", "evaluate": "9d7da53ebc"}),
    "demo": (["experiment=demo"], {"generate": "ffa949688b", "extend": "eedc0511be", "train": "0965a9483c", "evaluate": "292a4e5582"}),
    "remix": (["experiment=remix"], {"generate": "9e48cf1ea2", "extend": "c7a0d67bb6", "train": "7abbedc502", "evaluate": "8409f9fbb1"}),
    "nested": (["experiment=nested"], {"generate": "52981d21b7", "extend": "2c4fdfaec7", "train": "9e1d172ce6", "evaluate": "27d2d3d8fb"}),
    "pretrain_demo": (["experiment=pretrain_demo"], {"generate": "2979803466", "extend": "ec02e37a29", "train": "4e27f7d992", "evaluate": "b08f8491b5"}),
    "concise": (["metatoken=concise"], {"generate": "64d60d9d22", "extend": "eb0e749683", "train": "4c2c29c30d", "evaluate": "43d25f7a3e"}),
    "sft_full": (
        ["train.objective=sft", "train.params=full", "extend.init=random", "mixture.order=sorted"],
        {"generate": "d137b43600", "extend": "8b8945f82c", "train": "d170f13402", "evaluate": "e56cd415f3"},
    ),
    "nested_bootstrap": (BOOTSTRAP, {"extend": "1401d64dc3", "train": "5f16b1775e"}),
}


def stage_hashes(overrides):
    from pipeline import evaluate, extend, generate, outputs, train
    from pipeline.job import job_from_config

    cfg = compose(overrides)
    job = job_from_config(cfg)
    stages = {"generate": generate, "extend": extend, "train": train, "evaluate": evaluate}
    return {name: outputs.key_hash(module.stage_key(cfg, job)) for name, module in stages.items()}


@pytest.mark.parametrize("name", CASES)
def test_stage_keys_of_shipped_configs_do_not_change(name):
    overrides, expected = CASES[name]
    got = stage_hashes(overrides)
    assert {k: got[k] for k in expected} == expected


def test_bootstrap_generate_and_evaluate_keys_change_on_purpose():
    """Bootstrap mode's held-out samples now come from the reference teacher and the base model, so
    its generate and evaluate outputs are new results (its extend and train keys stay, above)."""
    got = stage_hashes(BOOTSTRAP)
    assert got["generate"] != "d61db3b637" and got["evaluate"] != "744a05bf20"


def test_a_probe_enters_no_stage_key():
    """The probe only changes what evaluate counts in sampled answers (re-run it with force=true)."""
    assert stage_hashes(["metatoken.probe.kind=words", "metatoken.probe.pattern=null"]) == stage_hashes([])
    assert stage_hashes(["metatoken.probe=null"]) == stage_hashes([])
