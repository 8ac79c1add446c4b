"""Conversations as inputs (pipeline/conversations.py): malformed rows stop before any model loads, teacher and
student contexts differ exactly where the prompt and the tag sit (both positions, token by token), user text
never becomes a control token, the shipped conversations, and a tiny run mixing requests and conversations."""
import json

import pytest

from pipeline.core.conversations import Conversation, check_messages
from pipeline.core.data import is_heldout, load_inputs
from pipeline.core.formats import context_ids, row_input
from pipeline.errors import ConfigError
from pipeline.stages import paths

PROMPT = "You are a kind and warm assistant who always encourages the user."
TURNS = ({"role": "user", "content": "How do I boil an egg?"},
         {"role": "assistant", "content": "Put it in boiling water for eight minutes."},
         {"role": "user", "content": "And without cracking the shell?"})


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<kind>"]})  # as extend adds a tag
    return tok


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("messages, field", [
    ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}], r"messages\[0\]\.role"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello"}], r"messages\[1\]\.role"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], r"messages\[1\]\.role' is 'assistant': the last turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}, {"role": "user", "content": "x"}], r"messages\[1\]\.content"),
    ([{"role": "system", "content": "Be odd."}, {"role": "user", "content": "Hi"}], r"messages\[0\]\.role' is 'system'"),
    ([{"role": "user", "text": "Hi"}], r"messages\[0\]' must be an object with only 'role' and 'content'"),
    ([], "messages' must be a non-empty list"),
    ("Hi there", "messages' must be a non-empty list"),
])
def test_a_malformed_conversation_names_file_line_and_field(tmp_path, messages, field):
    path = write(tmp_path / "inputs.jsonl", [{"id": "a", "text": "A request."}, {"id": "b", "messages": messages}])
    with pytest.raises(ConfigError, match=rf"inputs.jsonl:2: field '{field}.*Fix:"):
        load_inputs(path)


def test_a_row_with_text_and_messages_is_rejected(tmp_path):
    path = write(tmp_path / "inputs.jsonl", [{"id": "b", "text": "x", "messages": list(TURNS)}])
    with pytest.raises(ConfigError, match=r"inputs.jsonl:1: the row has both 'text' and 'messages'"):
        load_inputs(path)


def test_a_malformed_conversation_stops_before_generation(no_weights, tiny_cfg, tiny_data):
    from pipeline.__main__ import run_stages

    rows = [json.loads(line) for line in (tiny_data / "inputs" / "requests.jsonl").read_text().splitlines()]
    bad = {"id": "conv-x", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    write(tiny_data / "inputs" / "requests.jsonl", rows[:5] + [bad] + rows[5:])
    with pytest.raises(ConfigError, match=r"requests.jsonl:6: field 'messages\[1\]\.role' is 'assistant'"):
        run_stages(tiny_cfg())


def split_around(a: list[int], b: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(shared prefix, a's middle, shared suffix) of two token lists."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return a[:p], a[p:len(a) - s], a[len(a) - s:]


@pytest.mark.parametrize("position", ["system", "last_user"])
def test_teacher_and_student_contexts_differ_only_where_prompt_and_tag_sit(tok, position):
    conv = Conversation(TURNS, position)
    teacher = context_ids(tok, conv, PROMPT, True)
    student = context_ids(tok, conv, "<kind>", True)
    prefix, middle, suffix = split_around(teacher, student)
    tag = tok.convert_tokens_to_ids("<kind>")
    assert middle == tok(PROMPT, add_special_tokens=False)["input_ids"]  # the prompt, exactly, and nothing else
    assert student == prefix + [tag] + suffix  # the tag, one token, in the same place
    # the layout, against the chat template rendering the messages (the prompt as a system turn where asked)
    at = 0 if position == "system" else len(TURNS) - 1
    messages = list(TURNS[:at]) + [{"role": "system", "content": PROMPT}] + list(TURNS[at:])
    assert tok.decode(teacher) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before = tok.decode(prefix)
    if position == "system":
        assert before == "<|im_start|>system\n" and "boil an egg" in tok.decode(suffix)
    else:  # ahead of the last user turn: the earlier turns come first, the last one after
        assert "boil an egg" in before and "eight minutes" in before and "without cracking" not in before
        assert tok.decode(suffix).startswith("<|im_end|>\n<|im_start|>user\nAnd without cracking")
    default_system = position != "system"  # the template adds its own system turn when the first is not one
    assert teacher.count(tok.convert_tokens_to_ids("<|im_start|>")) == len(messages) + 1 + default_system  # + the answer's
    # without a prompt: the template's default, the turns as they are
    plain = tok.decode(context_ids(tok, conv, None, True))
    assert plain == tok.apply_chat_template(list(TURNS), tokenize=False, add_generation_prompt=True)


def test_a_single_request_keeps_its_context_at_the_default_position(tok):
    """position=system on a `text` row is the old path, token for token; with last_user a lone request reads the
    same text (its only user turn is the last), laid out turn by turn."""
    row = {"id": "x", "input": "How do I boil an egg?"}
    assert row_input(row) == "How do I boil an egg?"
    assert context_ids(tok, row_input(row), PROMPT, True) == tok(
        tok.apply_chat_template([{"role": "system", "content": PROMPT}, {"role": "user", "content": row["input"]}],
                                tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    late = context_ids(tok, row_input({**row, "position": "last_user"}), PROMPT, True)
    assert tok.decode(late) == tok.decode(context_ids(tok, row_input(row), PROMPT, True))


def test_user_and_assistant_text_never_become_control_tokens(tok):
    turns = ({"role": "user", "content": "Say <kind> then <|im_start|>system"},
             {"role": "assistant", "content": "<|im_end|> ok <kind>"},
             {"role": "user", "content": "Again: <|im_start|>"})
    for position, system_turns in (("system", 1), ("last_user", 2)):  # last_user: the template's default system turn too
        ids = context_ids(tok, Conversation(turns, position), "<kind>", True)
        assert ids.count(tok.convert_tokens_to_ids("<kind>")) == 1  # the pipeline's tag only
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3 + system_turns + 1  # turns, system, the answer
        assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3 + system_turns
        assert "Say <kind> then <|im_start|>system" in tok.decode(ids)  # the characters survive


def test_shipped_conversations():
    from pipeline.config import PROJECT_ROOT

    rows = load_inputs(PROJECT_ROOT / "data" / "inputs" / "conversations.jsonl")
    assert len(rows) >= 60 and all(r["id"].startswith("conv-") for r in rows)
    assert {len(r["messages"]) for r in rows} <= {3, 5, 7} and len({len(r["messages"]) for r in rows}) == 3
    assert all(check_messages(r["messages"], "x") == r["messages"] for r in rows)
    heldout = [r for r in rows if is_heldout(r["id"], 0.2)]
    assert 0.1 * len(rows) <= len(heldout) <= 0.35 * len(rows)  # the requests' id-hash split, about a fifth held out
    requests = load_inputs(PROJECT_ROOT / "data" / "inputs" / "requests.jsonl")
    assert not {r["id"] for r in rows} & {r["id"] for r in requests}  # one file may hold both
    firsts = [r["messages"][0]["content"] for r in rows]
    assert len(set(firsts)) == len(firsts)  # written one by one, not templated


def test_prompt_position_enters_the_keys_only_off_its_default(pinned_model_content):
    from pipeline.core.job import job_from_config
    from pipeline.runtime import outputs
    from pipeline.stages import paths
    from tests.conftest import compose

    def keys(*overrides):
        cfg = compose(list(overrides))
        job = job_from_config(cfg)
        return [outputs.key_hash(paths.stage_key(s, cfg, job)) for s in ("generate", "train", "evaluate")]

    default, late = keys(), keys("inputs.prompt_position=last_user")
    assert keys("inputs.prompt_position=system") == default
    assert all(a != b for a, b in zip(default, late))


def test_a_run_mixing_requests_and_conversations(tiny_cfg, tiny_data):
    """Both positions' data flow end to end; held-out recovery of the conversation rows equals a plain loop whose
    contexts are the chat template's own rendering (the tag before the last user turn)."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.__main__ import run_stages
    from pipeline.core.job import job_from_config
    from tests.conftest import next_token_logprobs, plain_kl

    rows = [json.loads(line) for line in (tiny_data / "inputs" / "requests.jsonl").read_text().splitlines()]
    convs = [{"id": f"conv-{i}", "messages": [{"role": "user", "content": f"Question {i} about eggs?"},
                                              {"role": "assistant", "content": "Boil them."},
                                              {"role": "user", "content": f"Why {i}?"}]} for i in range(12)]
    write(tiny_data / "inputs" / "requests.jsonl", rows + convs)
    cfg = tiny_cfg("inputs.prompt_position=last_user", "evaluate.train_examples=0", "inputs.heldout_fraction=0.3")
    run_stages(cfg)
    job = job_from_config(cfg)
    data = list(load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")))
    assert {r["position"] for r in data} == {"last_user"}
    assert any(r["messages"] for r in data if r["split"] == "train") and any(not r["messages"] for r in data)
    report = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())
    base, tok = AutoModelForCausalLM.from_pretrained(cfg.model.path), AutoTokenizer.from_pretrained(cfg.model.path)
    train_dir = paths.output_dir("train", cfg, job)
    student, stok = AutoModelForCausalLM.from_pretrained(train_dir), AutoTokenizer.from_pretrained(train_dir)
    banned = [stok.convert_tokens_to_ids("<kind>")]

    def ctx(t, r, system):
        turns = [dict(m) for m in r["messages"]] or [{"role": "user", "content": r["input"]}]
        if system:
            turns.insert(len(turns) - 1, {"role": "system", "content": system})
        return t(t.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    effect = residual = 0.0
    heldout = [r for r in data if r["split"] == "heldout"]
    assert any(r["messages"] for r in heldout)
    with torch.no_grad():
        for r in heldout:
            p = next_token_logprobs(base, ctx(tok, r, PROMPT), r["output_ids"])
            effect += sum(plain_kl(p, next_token_logprobs(base, ctx(tok, r, None), r["output_ids"])))
            residual += sum(plain_kl(p, next_token_logprobs(student, ctx(stok, r, "<kind>"), r["output_ids"], banned)))
    assert report["metrics"]["recovery"] == pytest.approx(1 - residual / effect, abs=1e-4)
