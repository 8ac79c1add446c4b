"""On-policy distillation (`train.objective=onpolicy`): the loss, the student's samples, training, resume, keys."""
import pytest

from pipeline import train
from pipeline.job import job_from_config
from tests.conftest import compose

# Train folders of shipped configs, computed before on-policy existed: they must never move.
KNOWN_TRAIN_FOLDERS = {
    ("experiment=demo",): "pirate-0965a9483c",
    (): "nice-1680218575",
    ("experiment=remix",): "nice+authoritative_tone+pirate-7abbedc502",
    ("experiment=nested",): "kind_expert-9e1d172ce6",
    ("experiment=pretrain_demo",): "pirate-4e27f7d992",
    ("experiment=demo", "train.teacher=online"): "pirate-ea57570b4f",
    ("experiment=demo", "train.objective=sft", "train.params=embedding"): "pirate-241bae85b4",
}


@pytest.mark.parametrize("overrides, folder", list(KNOWN_TRAIN_FOLDERS.items()))
def test_existing_train_keys_are_unchanged(overrides, folder):
    cfg = compose(list(overrides))
    assert train.output_dir(cfg, job_from_config(cfg)).name == folder
