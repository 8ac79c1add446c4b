"""The LM head only at scored positions, and the kept untagged reference: the loss and gradients do not change.

Every comparison is against the full computation the code did before (logits at every position,
then the scored ones picked; the reference run on every batch), written out here.
"""

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import TrainConfig
from pipeline.core import teacher as teacher_mod
from pipeline.core import trainer as train_mod
from pipeline.core.data import gather_positions
from pipeline.core.losses import suppress
from pipeline.core.metatokens import Metatoken
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.scoring import ReferenceMemo, scored_logits
from pipeline.core.teacher import CachedPromptTeacher
from pipeline.core.trainer import DistillCollator, build_examples, distill_loss, preserve_loss
from pipeline.stages.extend import extend_model
from pipeline.stages.train import frozen_start, prepare_trainable

KIND = Metatoken(tag="<kind>", prompt="You are a kind and warm assistant who always encourages the user.", source="test")
TEXTS = ["How do I boil an egg?", "Write a two line poem about autumn leaves please.", "Why?", "Explain why the sky is blue."]


def full_continuation_logits(model, batch, tag_ids, prefix=""):
    """The computation before the change: logits at every position, the continuation's picked afterwards."""
    logits = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits
    return suppress(gather_positions(logits, batch[prefix + "output_positions"]), tag_ids)


def full_scored_logits(model, positions, **inputs):
    return gather_positions(model(**inputs).logits, positions)


@pytest.fixture()
def student(tiny_model):
    """A LoRA student with a new tag on the tiny model, its frozen start, an online teacher and 4 examples."""
    tok, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    tag_ids = list(extend_model(model, tok, [KIND], "name_mean").values())
    torch.manual_seed(0)
    cfg = OmegaConf.structured(TrainConfig(params="lora", report_to="none"))
    model, groups = prepare_trainable(model, cfg, tag_ids)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): move it, so the student differs from its start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    frozen = frozen_start(model, "lora", None, None)
    teacher = CachedPromptTeacher(frozen, tok, KIND.prompt, chat=True, memo_mb=0)
    gen = torch.Generator().manual_seed(1)
    vocab = len(tok) - 1  # the teacher's vocabulary: no tag
    records = []
    for i, text in enumerate(TEXTS):  # continuations of different lengths, so rows are padded differently
        out = torch.randint(3, vocab, (3 + 2 * i,), generator=gen).tolist()
        top = torch.randn(len(out), vocab, generator=gen).log_softmax(-1).topk(5)
        records.append({"input": text, "tags": [KIND.tag], "output_ids": out,
                        "topk_ids": top.indices.tolist(), "topk_logprobs": top.values.tolist()})
    examples = build_examples(records, tok, True, teacher)
    return model, groups, frozen, teacher, tag_ids, examples, DistillCollator(tok.pad_token_id)


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10  # LoRA matrices and the embedding
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in grads_a.values())


def test_scored_logits_equal_the_full_ones_and_the_head_sees_only_scored_positions(student):
    model, _, _, _, tag_ids, examples, collate = student
    batch = collate(examples)
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    got = scored_logits(model, batch["output_positions"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    want = full_scored_logits(model, batch["output_positions"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert seen == [batch["output_positions"].shape[1]] < [batch["input_ids"].shape[1]]
    mask = batch["output_mask"]
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


def test_a_model_that_ignores_logits_to_keep_still_gets_the_scored_positions():
    class Full(torch.nn.Module):  # returns every position whatever it is asked for
        def forward(self, input_ids, logits_to_keep=None):
            return type("Out", (), {"logits": input_ids[..., None].float().expand(-1, -1, 3)})()

    ids = torch.arange(12).view(2, 6)
    positions = torch.tensor([[1, 2], [4, 5]])
    assert scored_logits(Full(), positions, input_ids=ids)[..., 0].tolist() == [[1, 2], [10, 11]]


@pytest.mark.parametrize("objective,online", [("kl", True), ("kl", False), ("sft", False)])
def test_distill_loss_and_gradients_equal_the_full_computation(student, monkeypatch, objective, online):
    model, _, _, teacher, tag_ids, examples, collate = student
    batch = collate(examples)
    t = teacher if online else None
    new = loss_and_grads(model, lambda: distill_loss(model, batch, objective, tag_ids, t))
    monkeypatch.setattr(train_mod, "batch_logits", full_continuation_logits)
    monkeypatch.setattr(teacher_mod, "scored_logits", full_scored_logits)
    old = loss_and_grads(model, lambda: distill_loss(model, batch, objective, tag_ids, t))
    assert_same(new, old)


def test_kept_reference_gives_the_same_untagged_loss_and_gradients_every_epoch(student, monkeypatch):
    model, groups, frozen, _, tag_ids, examples, collate = student
    memo = ReferenceMemo(memo_mb=64)
    optimizer = torch.optim.AdamW(groups)
    batches = [collate(examples[:2]), collate(examples[2:])]
    for epoch in range(2):
        for b in batches if epoch == 0 else [collate([examples[3], examples[0]]), collate([examples[1], examples[2]])]:
            kept = loss_and_grads(model, lambda: preserve_loss(model, frozen, b, tag_ids, memo))
            with monkeypatch.context() as m:  # the full computation, the reference run again
                m.setattr(train_mod, "batch_logits", full_continuation_logits)
                fresh = loss_and_grads(model, lambda: preserve_loss(model, frozen, b, tag_ids))
            assert_same(kept, fresh)
            # An optimizer step moves LoRA and the tag row: the student changes, the reference may not.
            model.zero_grad()
            preserve_loss(model, frozen, b, tag_ids, memo).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert memo.computed == 4  # the second epoch (rows reshuffled across batches) ran no reference at all
    assert kept[0] > 0  # the student did drift from its start: the term had something to measure


def test_reference_memo_keeps_no_more_than_its_budget(student):
    model, _, frozen, _, tag_ids, examples, collate = student
    batch = collate(examples)
    one_row = 3 * model.get_output_embeddings().weight.shape[0] * 4  # the shortest continuation, float32
    memo = ReferenceMemo(memo_mb=1.5 * one_row / 2**20)

    def compute(rows):
        with frozen() as ref:
            return full_continuation_logits(ref, rows, tag_ids, "plain_")

    with torch.no_grad():
        memo.logits(compute, batch, tag_ids)
        memo.logits(compute, batch, tag_ids)
    assert len(memo.memo) == 1 and memo.computed == 4 + 3  # only the first (shortest) row fit; the rest ran again


def test_a_model_that_slices_positions_its_own_way_fails_clearly():
    class OldStyle(torch.nn.Module):  # hidden[:, positions] on a 2D tensor: [B, B, T, V], not per row
        def forward(self, input_ids, logits_to_keep=None):
            hidden = input_ids[..., None].float().expand(-1, -1, 3)
            return type("Out", (), {"logits": hidden[:, logits_to_keep]})()

    with pytest.raises(ValueError, match="2D `logits_to_keep`"):
        scored_logits(OldStyle(), torch.tensor([[1, 2], [4, 5]]), input_ids=torch.arange(12).view(2, 6))
