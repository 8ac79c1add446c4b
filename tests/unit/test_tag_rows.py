"""The tag rows as their own parameter (core/tag_rows.py): the same function and gradient as training the
rows in place, and a plain model again after `merge`."""
import torch
from transformers import AutoModelForCausalLM

from pipeline.core import tag_rows
from pipeline.core.losses import suppress


def _model(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def _batch(vocab: int, tag_ids: list[int]) -> torch.Tensor:
    ids = torch.randint(3, vocab - 3, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[0, 2], ids[1, 5], ids[1, 6] = tag_ids[0], tag_ids[1], tag_ids[0]
    return ids


def _loss(model, ids, tag_ids):
    logits = suppress(model(input_ids=ids).logits, tag_ids)  # as in training: tags never written
    return torch.log_softmax(logits, -1)[..., 7].mean()


def test_attached_rows_give_the_same_loss_and_tag_row_gradient_as_the_rows_trained_in_place(tiny_model):
    in_place, attached = _model(tiny_model), _model(tiny_model)
    vocab = in_place.get_input_embeddings().weight.shape[0]
    tag_ids = [vocab - 1, vocab - 2]
    ids = _batch(vocab, tag_ids)
    with torch.no_grad():  # move the tag rows off their start in both, identically
        for m in (in_place, attached):
            m.get_input_embeddings().weight[tag_ids] += 0.3
    # the reference computation: the whole (tied) matrix trains, its gradient read at the tag rows
    in_place.requires_grad_(False)
    weight = in_place.get_input_embeddings().weight.requires_grad_(True)
    expected_loss = _loss(in_place, ids, tag_ids)
    expected_loss.backward()
    attached.requires_grad_(False)
    rows = tag_rows.attach(attached.get_input_embeddings(), tag_ids)
    loss = _loss(attached, ids, tag_ids)
    loss.backward()
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert rows.grad.abs().sum() > 0
    assert torch.allclose(rows.grad, weight.grad[tag_ids], atol=1e-6)
    assert attached.get_input_embeddings().weight.grad is None  # the matrix itself never gets a gradient


def test_merge_writes_the_rows_into_the_tied_matrix_and_leaves_a_plain_model(tiny_model, tmp_path):
    model = _model(tiny_model)
    embedding = model.get_input_embeddings()
    vocab = embedding.weight.shape[0]
    tag_ids = [vocab - 1]
    before = embedding.weight.detach().clone()
    keys = set(model.state_dict())
    rows = tag_rows.attach(embedding, tag_ids)
    with torch.no_grad():
        rows.add_(1.0)
    ids = _batch(vocab, [vocab - 1, vocab - 1])
    live = suppress(model(input_ids=ids).logits, tag_ids)
    checkpoint = tag_rows.merged_weight(embedding)
    assert torch.equal(checkpoint[tag_ids], before[tag_ids] + 1.0) and torch.equal(checkpoint[:-1], before[:-1])
    tag_rows.merge(embedding)
    assert not tag_rows.attached(embedding) and set(model.state_dict()) == keys
    assert torch.equal(embedding.weight[:-1], before[:-1])  # every other row exactly as it was
    if model.config.tie_word_embeddings:
        assert torch.equal(model.get_output_embeddings().weight[tag_ids], before[tag_ids] + 1.0)
    # the merged model computes the same distribution (the tag's own logit differs: its tied output row now
    # holds the trained row, and tags are suppressed wherever the student is scored or sampled)
    assert torch.allclose(suppress(model(input_ids=ids).logits, tag_ids), live, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_input_embeddings().weight, embedding.weight)


def test_load_restores_the_rows_from_a_checkpoint_matrix(tiny_model):
    model = _model(tiny_model)
    embedding = model.get_input_embeddings()
    tag_ids = [embedding.weight.shape[0] - 1]
    rows = tag_rows.attach(embedding, tag_ids)
    saved = tag_rows.merged_weight(embedding)
    saved[tag_ids] = 7.0
    tag_rows.load(embedding, saved)
    assert torch.equal(rows.detach(), torch.full_like(rows, 7.0))
