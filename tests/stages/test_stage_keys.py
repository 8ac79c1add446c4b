"""Stage keys of the shipped configs stay what they were: every cached output on disk stays valid.

The model enters every key by the hash of its files (which differ between conversions), so these pins
hold the model's content fixed and check the rest of the key. They were recorded before the config schema
gained Enums, range checks and new fields (issue 14) and before the evaluation work of issue 13, with the
model's content in the key (the one deliberate change of every key); a new config field must leave them
unchanged. The other deliberate change is marked where it is asserted.
"""
import pytest

from tests.conftest import compose


@pytest.fixture(autouse=True)
def _pinned(pinned_model_content):
    """Every pin below holds the model's content fixed (see conftest)."""


BOOTSTRAP = ["experiment=nested", "generate.teacher_mode=bootstrap",
             "generate.bootstrap_model=outputs/train/nice+authoritative_tone+pirate-7abbedc502"]
PRETRAIN_DEMO_BEFORE = ["experiment=pretrain_demo", "train.params=embedding", "inputs.max_train=64", "inputs.max_heldout=16",
                        "mixture.paired=false", "mixture.untagged=0", "train.pretrain.plain_from=corpus",
                        "train.pretrain.loss=lm", "train.pretrain.targets=all"]
CASES = {
    "default": ([], {"generate": "4afa5c1d43", "extend": "c8517c2421", "train": "ea24db4e91", "evaluate": "a59e4b0496"}),
    # the demo before it trained in bf16 on 160 inputs (3 December 2026)
    "demo_80_float32": (["experiment=demo", "inputs.max_train=80", "train.bf16=false"],
                        {"generate": "296f0b3219", "extend": "42afc11faf", "train": "c6f67ca334", "evaluate": "e7b1691077"}),
    "demo": (["experiment=demo"], {"generate": "92b5dfd817", "extend": "42afc11faf", "train": "97590a3b20", "evaluate": "2716bd8fbd"}),
    "remix": (["experiment=remix"], {"generate": "0dd73205d7", "extend": "3b41cc2b6f", "train": "fd2e31693f", "evaluate": "cf3e8f6b42"}),
    "nested": (["experiment=nested"], {"generate": "45c5186845", "extend": "a168ce45eb", "train": "b8caed8cda", "evaluate": "a9f35d2649"}),
    # the pretrain demo before it trained LoRA on the generated tokens only (7 December 2026)
    "pretrain_demo_embedding": (PRETRAIN_DEMO_BEFORE,
                                {"generate": "23a7f62a0d", "extend": "d18a0f76e4", "train": "f03be07d6e", "evaluate": "99226c1423"}),
    "pretrain_demo": (["experiment=pretrain_demo"], {"generate": "3efb2bfa3c", "extend": "d18a0f76e4", "train": "803324155f", "evaluate": "4452dadc22"}),
    "concise": (["metatoken=concise"], {"generate": "9794497fa1", "extend": "33bedc3d0c", "train": "ecbf361264", "evaluate": "7b3319e342"}),
    "sft_full": (
        ["train.objective=sft", "train.params=full", "extend.init=random", "mixture.order=sorted"],
        {"generate": "f0ecdbf4c0", "extend": "272ef175e8", "train": "9761883628", "evaluate": "883c3f7c85"},
    ),
    "nested_bootstrap": (BOOTSTRAP, {"extend": "25591cddc2", "train": "644d2424dd"}),
}


def stage_hashes(overrides):
    from pipeline.core.job import job_from_config
    from pipeline.runtime import outputs
    from pipeline.stages import paths

    cfg = compose(overrides)
    job = job_from_config(cfg)
    return {name: outputs.key_hash(paths.stage_key(name, cfg, job)) for name in ("generate", "extend", "train", "evaluate")}


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


def test_a_probe_enters_the_evaluate_key_only():
    """The probe only changes what evaluate counts in sampled answers: earlier stages are reused, and an
    edited probe gets a new evaluation instead of the old counts."""
    edited, shipped, none = (stage_hashes(o) for o in (["metatoken.probe.kind=words", "metatoken.probe.pattern=null"], [], ["metatoken.probe=null"]))
    for other in (edited, none):
        assert {k: v for k, v in other.items() if k != "evaluate"} == {k: v for k, v in shipped.items() if k != "evaluate"}
    assert len({edited["evaluate"], shipped["evaluate"], none["evaluate"]}) == 3


def test_the_quality_preset_is_the_fidelity_row_it_reports():
    """conf/experiment/quality.yaml and the README quote row data-768-e3-bf16 of benchmarks/fidelity.py: the
    preset must give that row's keys (the same outputs), or its quoted recovery belongs to another recipe."""
    preset = stage_hashes(["experiment=quality", "metatoken=pirate"])
    row = stage_hashes(["stage=all", "metatoken=pirate", "inputs.synthetic.count=512", "train.bf16=true"])
    assert preset == row
    assert preset != stage_hashes(["stage=all", "metatoken=pirate", "inputs.synthetic.count=512"])  # bf16 is in the key


def test_the_pretrain_demo_is_the_fidelity_row_it_reports():
    """conf/experiment/pretrain_demo.yaml, docs/pretrain.md and the README quote row pretrain-own-kl-generated."""
    assert stage_hashes(["experiment=pretrain_demo"]) == stage_hashes(FIDELITY_ROWS["pretrain-own-kl-generated"])


def test_the_pretrain_quality_preset_is_the_fidelity_row_it_reports():
    """conf/experiment/pretrain_quality.yaml (the pretrain demo plus 384 synthesized openings) is row
    pretrain-own-kl-generated-syn384, whose recovery the README and docs/pretrain.md quote; it differs from the demo."""
    preset = stage_hashes(["experiment=pretrain_quality"])
    assert preset == stage_hashes(FIDELITY_ROWS["pretrain-own-kl-generated-syn384"])
    assert preset["generate"] != stage_hashes(["experiment=pretrain_demo"])["generate"]  # the synthesized openings count


def fidelity_rows() -> dict:
    """benchmarks/fidelity.py's RUNS as the argument lists it runs (a script, not a package: loaded from its path)."""
    import importlib.util

    from pipeline.config import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("fidelity_study", PROJECT_ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: module.replacing(module.COMMON, overrides) for name, (_, _, overrides) in module.RUNS.items()}


FIDELITY_ROWS = fidelity_rows()


@pytest.mark.parametrize("name", FIDELITY_ROWS)
def test_every_fidelity_row_passes_the_checks_a_run_makes_first(name, tmp_path):
    """Each row of the study is a command a later session starts for 10-80 minutes of CPU: a typo in its overrides
    (a key, a value, a tag set) must fail here, not after synthesis and generation have spent their time."""
    from pipeline.__main__ import check_before_running

    keys = [o.split("=", 1)[0] for o in FIDELITY_ROWS[name]]
    assert len(keys) == len(set(keys)), f"{name} gives a key twice: the command line refuses that (compose here would not)"
    check_before_running(compose([*FIDELITY_ROWS[name], f"paths.outputs={tmp_path}"]))


def test_the_checks_refuse_a_bad_fidelity_row(tmp_path):
    from pipeline.__main__ import check_before_running
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="mixture.untagged"):
        check_before_running(compose([*FIDELITY_ROWS["demo-own-untagged"], "mixture.untagged=1.5", f"paths.outputs={tmp_path}"]))
