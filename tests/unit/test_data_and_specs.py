"""Input files, the train/held-out split, batching, and metatoken specs with their errors."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.core.data import gather_positions, load_inputs, pad_examples, split_inputs
from pipeline.core.metatokens import resolve_metatoken
from pipeline.errors import ConfigError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_split_is_stable_when_rows_are_added(tmp_path):
    rows = [{"id": f"x{i}", "text": "t"} for i in range(200)]
    train, heldout = split_inputs(rows, 0.25)
    assert len(train) + len(heldout) == 200 and 25 < len(heldout) < 75
    more_train, more_heldout = split_inputs(rows + [{"id": f"y{i}", "text": "t"} for i in range(50)], 0.25)
    assert {r["id"] for r in heldout} <= {r["id"] for r in more_heldout}
    assert {r["id"] for r in train} <= {r["id"] for r in more_train}


def test_shipped_inputs_load_and_split():
    from pipeline.config import PROJECT_ROOT

    rows = load_inputs(PROJECT_ROOT / "data/inputs/requests.jsonl")
    train, heldout = split_inputs(rows, 0.2)
    assert len(rows) >= 240 and len(heldout) >= 32 and not {r["id"] for r in train} & {r["id"] for r in heldout}


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "text": "hi"}', '{"id": "b"}'], r"requests.jsonl:2: field 'text' is missing or empty"),
        (['{"id": "a", "text": "  "}'], r"requests.jsonl:1: field 'text' is missing or empty"),
        (['{"text": "hi"}'], r"requests.jsonl:1: field 'id' is missing"),
        (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], r"id 'a' \(str\) is the same id as 'a' \(str\) on line 1"),
        (['{"id": "8", "text": "x"}', '{"id": 8, "text": "y"}'], r"id 8 \(int\) is the same id as '8' \(str\) on line 1: both are '8' as strings"),
        (["not json"], r"requests.jsonl:1: not valid JSON"),
        ([""], r"no rows"),
    ],
)
def test_bad_input_files_name_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        load_inputs(write_jsonl(tmp_path / "requests.jsonl", lines))


def test_missing_input_file(tmp_path):
    with pytest.raises(ConfigError, match="inputs.file: .*nope.jsonl does not exist"):
        load_inputs(tmp_path / "nope.jsonl")


def test_pad_examples_positions_point_at_the_logits_that_predict_each_token():
    batch = pad_examples([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["output_positions"].tolist() == [[2, 3, 0], [0, 1, 2]]
    assert batch["output_mask"].tolist() == [[True, True, False], [True, True, True]]
    logits = torch.arange(10.0).view(2, 5, 1)
    assert gather_positions(logits, batch["output_positions"])[..., 0].tolist() == [[2, 3, 0], [5, 6, 7]]


def spec(**kw):
    return OmegaConf.create({"tag": "<nice>", "prompt": None, "prompt_file": None, **kw})


def test_metatoken_reads_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_text("  Be nice.\n")
    m = resolve_metatoken(spec(prompt_file="p.txt"), tmp_path, "conf/metatoken/nice.yaml")
    assert (m.tag, m.prompt, m.name) == ("<nice>", "Be nice.", "nice")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tag": "nice", "prompt": "x"}, r"conf/metatoken/nice.yaml: field 'tag' is 'nice'.*Fix: write it as '<name>'"),
        ({"tag": "<very nice>", "prompt": "x"}, r"field 'tag' is '<very nice>'"),
        ({"tag": "<a><b>", "prompt": "x"}, r"field 'tag'"),
        ({"prompt": "   "}, r"conf/metatoken/nice.yaml: the prompt of <nice> is empty"),
        ({"prompt_file": "missing.txt"}, r"field 'prompt_file' points to .*missing.txt, which does not exist"),
        ({"prompt": "x", "prompt_file": "p.txt"}, r"both 'prompt' and 'prompt_file' are set"),
    ],
)
def test_bad_metatoken_specs_name_file_field_and_fix(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        resolve_metatoken(spec(**fields), tmp_path, "conf/metatoken/nice.yaml")


def test_every_shipped_metatoken_resolves():
    from pipeline.config import PROJECT_ROOT, MetatokenConfig

    for path in sorted((PROJECT_ROOT / "conf/metatoken").glob("*.yaml")):
        node = OmegaConf.merge(OmegaConf.structured(MetatokenConfig), OmegaConf.load(path))
        m = resolve_metatoken(node, PROJECT_ROOT / "data", str(path))
        assert len(m.prompt.split()) > 100 or "<" in m.prompt, f"{path}: prompts worth compressing are long"
