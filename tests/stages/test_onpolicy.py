"""On-policy distillation (`train.objective=onpolicy`): the loss, the student's samples, training, resume, keys."""
import contextlib
import copy
import json
import math

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.core import onpolicy, trainer
from pipeline.core.formats import context_ids
from pipeline.core.job import job_from_config
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.teacher import CachedPromptTeacher
from pipeline.errors import ConfigError
from pipeline.stages import extend, generate, paths
from pipeline.stages.extend import extend_model
from tests.conftest import compose
from tests.stages.resume import uninterrupted_and_resumed
from tests.unit.test_losses import brute_force_jsd

PROMPT = "You are a kind and warm assistant who always encourages the user."
TEXTS = ["How do I boil an egg?", "Write a two line poem about autumn leaves please.", "Why?", "Explain the sky."]

# Train folders of shipped configs (model content held fixed), computed before on-policy existed (the online
# and sft rows re-pinned with the model content in the key): they must never move. The demo's rows hold its
# batch size, inputs and precision of then (8, 80, float32; the demo now trains with 2, 160, bf16: pinned in test_stage_keys).
DEMO = ("experiment=demo", "train.batch_size=8", "inputs.max_train=80", "train.bf16=false")
KNOWN_TRAIN_FOLDERS = {
    DEMO: "pirate-ea37881157",
    (): "nice-ea24db4e91",
    ("experiment=remix",): "nice+authoritative_tone+pirate-fd2e31693f",
    ("experiment=nested",): "kind_expert-b8caed8cda",
    ("experiment=pretrain_demo", "train.params=embedding", "inputs.max_train=64", "inputs.max_heldout=16", "mixture.paired=false",
     "mixture.untagged=0", "train.pretrain.plain_from=corpus", "train.pretrain.loss=lm", "train.pretrain.targets=all"): "pirate-f03be07d6e",  # the pretrain demo before 7 December
    (*DEMO, "train.teacher=online"): "pirate-5f1bb57e88",
    (*DEMO, "train.objective=sft", "train.params=embedding"): "pirate-63a1b6b093",
}


def train_folder(*overrides: str) -> str:
    cfg = compose(list(overrides))
    return paths.output_dir("train", cfg, job_from_config(cfg)).name


@pytest.mark.parametrize("overrides, folder", list(KNOWN_TRAIN_FOLDERS.items()))
def test_existing_train_keys_are_unchanged(overrides, folder, pinned_model_content):
    assert train_folder(*overrides) == folder
    # the on-policy knobs do not reach a kl / sft key, whatever their values
    knobs = ("train.onpolicy_loss=jsd", "train.onpolicy_beta=0.1", "train.onpolicy_share=0.3", "train.onpolicy_top_p=0.5")
    assert train_folder(*overrides, *knobs) == folder


def test_onpolicy_keys_hold_what_changes_the_result():
    demo = train_folder("experiment=demo")
    reverse = train_folder("experiment=demo", "train.objective=onpolicy")
    assert reverse != demo
    assert train_folder("experiment=demo", "train.objective=onpolicy", "train.onpolicy_beta=0.1") == reverse  # no beta in reverse KL
    jsd = train_folder("experiment=demo", "train.objective=onpolicy", "train.onpolicy_loss=jsd")
    assert len({reverse, jsd, train_folder("experiment=demo", "train.objective=onpolicy", "train.onpolicy_loss=jsd", "train.onpolicy_beta=0.1")}) == 3
    # the sample length follows the teacher's by default, and is part of the key
    assert train_folder("experiment=demo", "train.objective=onpolicy", "train.onpolicy_max_new_tokens=48") == reverse
    assert train_folder("experiment=demo", "train.objective=onpolicy", "train.onpolicy_max_new_tokens=16") != reverse


def settings(**fields) -> onpolicy.Settings:
    base = dict(loss="reverse_kl", beta=0.5, share=1.0, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0,
                recorded_offpolicy=True)
    return onpolicy.Settings(**{**base, **fields})


@pytest.fixture()
def extended(tiny_model):
    """The tiny model after `extend` (one new tag), and its tokenizer and tag id."""
    model, tok = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    tag_id = extend_model(model, tok, [extend.Metatoken("<kind>", PROMPT, "test")], "prompt_mean")["<kind>"]
    return model, tok, tag_id


def student_contexts(tok):
    return [context_ids(tok, t, "<kind>", chat=True) for t in TEXTS]


def test_student_samples_never_contain_a_tag_even_when_the_student_prefers_it(extended):
    model, tok, tag_id = extended
    # A student that would write its tag nearly everywhere: +30 on the tag's logit at every position.
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(-1, torch.tensor([tag_id]), torch.full((*out.shape[:-1], 1), 30.0)))
    # and whose own generation config does not list it (extend writes it there; the sampler must not rely on that)
    model.generation_config.suppress_tokens = None
    contexts = student_contexts(tok)
    ids = torch.tensor([contexts[1]])
    torch.manual_seed(0)
    unprotected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 max_new_tokens=8, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert unprotected.count(tag_id) >= 6  # sampled freely, this student writes its tag
    for seed in range(3):
        samples = onpolicy.sample_student(model, contexts, [tag_id], tok.pad_token_id, settings(max_new_tokens=8), seed)
        assert sum(map(len, samples)) >= 8 and not any(tag_id in s for s in samples)
    hook.remove()


def test_samples_depend_only_on_the_seed_and_leave_the_global_generator_alone(extended):
    model, tok, tag_id = extended
    model.train()
    contexts, s = student_contexts(tok), settings(max_new_tokens=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = onpolicy.sample_student(model, contexts, [tag_id], tok.pad_token_id, s, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # dropout / data order see the generator they would have seen
    assert model.training  # eval mode only while sampling
    torch.manual_seed(999)
    assert onpolicy.sample_student(model, contexts, [tag_id], tok.pad_token_id, s, seed=7) == first
    assert onpolicy.sample_student(model, contexts, [tag_id], tok.pad_token_id, s, seed=8) != first
    assert onpolicy.draw_seed(0, 3, 0, 0, "samples") == onpolicy.draw_seed(0, 3, 0, 0, "samples")
    assert len({onpolicy.draw_seed(0, step, micro, 0, "samples") for step in range(3) for micro in range(2)}) == 6


def brute_force_position_losses(teacher_rows, student_rows, lengths, beta) -> float:
    """Token-weighted mean of the per-position divergence, by plain loops (the tag column dropped: suppressed)."""
    total, count = 0.0, 0
    for t_rows, s_rows, n in zip(teacher_rows, student_rows, lengths):
        for t in range(n):
            total += brute_force_jsd(s_rows[t], t_rows[t], beta)
            count += 1
    return total / count


def naive_logits(model, context: list[int], continuation: list[int], vocab: int) -> list[list[float]]:
    """The logits predicting each continuation token from a plain forward pass (no cache), old vocabulary only."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0, len(context) - 1 : len(context) - 1 + len(continuation)]
    return logits[:, :vocab].tolist()


@pytest.mark.parametrize("loss, beta", [("reverse_kl", 1.0), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.9)])
def test_onpolicy_loss_equals_a_brute_force_loop_over_full_distributions(tiny_model, extended, loss, beta):
    """The trainer's loss on one batch = the divergence between a naive teacher (full prompt, no cache)
    and the student on the student's own samples, summed by loops."""
    student, tok, tag_id = extended
    base = copy.deepcopy(student).requires_grad_(False)  # the teacher: the frozen start, reading the full prompt
    with torch.no_grad():  # a student that differs from the model without prompt
        student.get_input_embeddings().weight[tag_id] += 0.5 * torch.randn(student.config.hidden_size)
    vocab = tag_id  # the old vocabulary: the tag is suppressed on both sides
    teacher = CachedPromptTeacher(lambda: contextlib.nullcontext(base), tok, PROMPT, chat=True)
    records = [{"id": f"r{i}", "input": t, "tags": ["<kind>"], "output_ids": [5, 6], "topk_ids": [[5], [6]],
                "topk_logprobs": [[-0.5], [-0.5]]} for i, t in enumerate(TEXTS)]
    batch = trainer.DistillCollator(tok.pad_token_id)(trainer.build_examples(records, tok, True, teacher))
    s = settings(loss=loss, beta=0.5 if loss == "reverse_kl" else beta, max_new_tokens=6)
    got = trainer.onpolicy_loss(student, student, batch, [tag_id], teacher, s, seed=11, pad_id=tok.pad_token_id)

    samples = onpolicy.sample_student(student, student_contexts(tok), [tag_id], tok.pad_token_id, s, seed=11)
    assert max(map(len, samples)) > 1
    teacher_rows = [naive_logits(base, context_ids(tok, t, PROMPT, True), o, vocab) for t, o in zip(TEXTS, samples)]
    student_rows = [naive_logits(student, c, o, vocab) for c, o in zip(student_contexts(tok), samples)]
    expected = brute_force_position_losses(teacher_rows, student_rows, map(len, samples), beta)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    got.backward()
    assert student.get_input_embeddings().weight.grad[tag_id].abs().sum() > 0  # the student pass carries the gradient


def test_offpolicy_steps_score_the_recorded_samples_against_the_online_teacher(tiny_model, extended):
    student, tok, tag_id = extended
    base = copy.deepcopy(student).requires_grad_(False)
    teacher = CachedPromptTeacher(lambda: contextlib.nullcontext(base), tok, PROMPT, chat=True)
    outs = [[5, 6, 7], [9, 10], [11], [12, 13, 14]]
    records = [{"id": f"r{i}", "input": t, "tags": ["<kind>"], "output_ids": o, "topk_ids": [[1]] * len(o),
                "topk_logprobs": [[-0.5]] * len(o)} for i, (t, o) in enumerate(zip(TEXTS, outs))]
    batch = trainer.DistillCollator(tok.pad_token_id)(trainer.build_examples(records, tok, True, teacher))
    got = trainer.offpolicy_loss(student, batch, [tag_id], teacher, settings(loss="jsd", beta=0.3, recorded_offpolicy=False))
    teacher_rows = [naive_logits(base, context_ids(tok, t, PROMPT, True), o, tag_id) for t, o in zip(TEXTS, outs)]
    student_rows = [naive_logits(student, c, o, tag_id) for c, o in zip(student_contexts(tok), outs)]
    assert got.item() == pytest.approx(brute_force_position_losses(teacher_rows, student_rows, map(len, outs), 0.3), rel=1e-4)


def residual_by_loop(teacher_model, teacher_tok, student_dir, rows, prompt: str) -> float:
    """Held-out KL(teacher || student), token-weighted, by plain loops over full distributions (tag dropped)."""
    student, tok = AutoModelForCausalLM.from_pretrained(student_dir), AutoTokenizer.from_pretrained(student_dir)
    vocab = teacher_model.config.vocab_size
    total, count = 0.0, 0
    for r in rows:
        p_rows = naive_logits(teacher_model, context_ids(teacher_tok, r["input"], prompt, True), r["output_ids"], vocab)
        q_rows = naive_logits(student, context_ids(tok, r["input"], "<kind>", True), r["output_ids"], vocab)
        for p_row, q_row in zip(p_rows, q_rows):
            total += brute_force_jsd(q_row, p_row, 0.0)  # beta 0: forward KL(p || q)
            count += 1
    return total / count


def test_onpolicy_training_lowers_the_heldout_residual(tiny_cfg, tiny_model, tiny_data, monkeypatch):
    drawn = []
    sample = onpolicy.sample_student
    monkeypatch.setattr(onpolicy, "sample_student", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    cfg = tiny_cfg("train.objective=onpolicy", "train.max_steps=6", "train.embedding_lr=0.05", "stage=all")
    run_stages(cfg)
    job = job_from_config(cfg)
    tag_id = AutoTokenizer.from_pretrained(paths.output_dir("extend", cfg, job)).convert_tokens_to_ids("<kind>")
    assert len(drawn) == 6 and all(s and tag_id not in s for batch in drawn for s in batch)  # every step sampled, no tag
    heldout = [r for r in load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")) if r["split"] == "heldout"]
    base, base_tok = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    prompt = (tiny_data / "prompts" / "kind.txt").read_text().strip()  # as the metatoken reads it
    untrained = residual_by_loop(base, base_tok, paths.output_dir("extend", cfg, job), heldout, prompt)
    trained = residual_by_loop(base, base_tok, paths.output_dir("train", cfg, job), heldout, prompt)
    assert trained < 0.85 * untrained, (trained, untrained)

    metrics = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())["metrics"]
    assert metrics["residual_kl"] == pytest.approx(trained, rel=1e-3)
    assert metrics["init_residual_kl"] == pytest.approx(untrained, rel=1e-3)


def test_interrupted_onpolicy_training_resumes_to_the_same_weights(tiny_cfg, monkeypatch):
    """Stop after the step-2 checkpoint, run again: the same samples are drawn, the same weights come out."""
    overrides = ("train.objective=onpolicy", "train.onpolicy_share=0.5", "train.onpolicy_loss=jsd", "train.max_steps=4",
                 "train.save_steps=2", "train.lr=0.01", "train.embedding_lr=0.05")
    kinds = [onpolicy.is_onpolicy_step(settings(share=0.5), step, 0) for step in range(4)]
    assert kinds[2] and not all(kinds)  # on- and off-policy steps, and the first resumed step samples
    cfg = tiny_cfg(*overrides)
    for stage in ("generate", "extend"):
        run_stages(tiny_cfg(*overrides, f"stage={stage}"))
    job = job_from_config(cfg)
    reference, resumed = uninterrupted_and_resumed(cfg, job, monkeypatch)
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6) for k in reference)
    start = AutoModelForCausalLM.from_pretrained(paths.output_dir("extend", cfg, job)).state_dict()
    assert not all(torch.allclose(resumed[k], start[k], atol=1e-4) for k in start)  # training did move the weights


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.onpolicy_beta=1.5"], r"train.onpolicy_beta is 1.5. Fix: use a number between 0 and 1"),
        (["train.onpolicy_share=-0.1"], r"train.onpolicy_share is -0.1"),
        (["train.onpolicy_max_new_tokens=0"], r"train.onpolicy_max_new_tokens is 0. Fix: use at least 1"),
        (["train.onpolicy_temperature=0"], r"train.onpolicy_temperature is 0.0. Fix"),
        (["train.onpolicy_top_p=1.5"], r"train.onpolicy_top_p is 1.5"),
        (["mixture.untagged=0.2"], r"several tag sets .* Fix: train one tag set"),
        (["train.mode=pretrain", "model.chat=false"], r"train.mode=pretrain .* Fix: use train.mode=finetune"),
    ],
)
def test_bad_onpolicy_settings_fail_before_any_stage_runs(tiny_cfg, monkeypatch, overrides, message):
    import pipeline.core.models

    monkeypatch.setattr(pipeline.core.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(generate, "run", lambda *a, **k: pytest.fail("generate ran"))
    objective = [] if any(o.startswith("train.objective") for o in overrides) else ["train.objective=onpolicy"]
    with pytest.raises(ConfigError, match=message):
        run_stages(tiny_cfg("stage=all", *objective, *overrides))


def test_offpolicy_steps_against_the_recorded_topk_use_its_bins(extended):
    """Recorded teacher: the divergence between the k+1 bins (top-k tokens, the rest), by loops over the student's full distribution."""
    student, tok, tag_id = extended
    outs = [[5, 6, 7], [9, 10], [11], [12, 13, 14]]
    top_ids = [[[t, t + 1] for t in o] for o in outs]  # the recorded top-2 at each position
    top_probs = [0.5, 0.2]  # and their probabilities (the rest: 0.3)
    records = [{"id": f"r{i}", "input": t, "tags": ["<kind>"], "output_ids": o, "topk_ids": ids,
                "topk_logprobs": [[math.log(p) for p in top_probs]] * len(o)}
               for i, (t, o, ids) in enumerate(zip(TEXTS, outs, top_ids))]
    batch = trainer.DistillCollator(tok.pad_token_id)(trainer.build_examples(records, tok, True))
    for loss, beta in (("reverse_kl", 1.0), ("jsd", 0.3)):
        got = trainer.offpolicy_loss(student, batch, [tag_id], None, settings(loss=loss, beta=beta))
        total, count = 0.0, 0
        for ctx, o, ids in zip(student_contexts(tok), outs, top_ids):
            for row, (a, b) in zip(naive_logits(student, ctx, o, tag_id), ids):
                q = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
                q_bins = [q[a], q[b], 1 - q[a] - q[b]]
                total += brute_force_jsd([math.log(x) for x in q_bins], [math.log(x) for x in (*top_probs, 0.3)], beta)
                count += 1
        assert got.item() == pytest.approx(total / count, rel=1e-4), loss
