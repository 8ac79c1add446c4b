"""The shared prompt: its keys are read, never copied, and nothing changes but the speed."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from pipeline.core import teacher as teacher_mod
from pipeline.core.metatokens import Metatoken
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.teacher import CachedPromptTeacher, shared_prompt_attention

KIND = Metatoken(tag="<kind>", prompt="You are a kind and warm assistant who always encourages the user.", source="test")
TEXTS = ["How do I boil an egg?", "Write a two line poem about autumn leaves please.", "Why?"]
OUTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def reference_attention(query, prompt_keys, prompt_values, keys, values, mask, scaling):
    """Stock SDPA over the prompt copied in front of every row's keys (what the shared path avoids)."""
    b, q, s = query.shape[0], query.shape[2], keys.shape[2]
    full_k = torch.cat([prompt_keys.expand(b, -1, -1, -1), keys], dim=2)
    full_v = torch.cat([prompt_values.expand(b, -1, -1, -1), values], dim=2)
    if mask is None:
        mask = torch.ones(q, s, dtype=torch.bool).tril(s - q)[None, None].expand(b, 1, q, s)
    full_mask = torch.cat([torch.ones(b, 1, q, prompt_keys.shape[2], dtype=torch.bool), mask], dim=-1)
    out = F.scaled_dot_product_attention(query, full_k, full_v, attn_mask=full_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,q,s", [(6, 2, 1, 5), (6, 2, 4, 4), (4, 4, 3, 7), (9, 3, 1, 1), (6, 2, 16, 16), (6, 2, 17, 20)])
@pytest.mark.parametrize("padded", [False, True])
def test_shared_prompt_attention_equals_sdpa_over_the_copied_prompt(heads, kv_heads, q, s, padded):
    torch.manual_seed(0)
    b, p, d = 3, 11, 8
    query = torch.randn(b, heads, q, d)
    pk, pv = torch.randn(1, kv_heads, p, d), torch.randn(1, kv_heads, p, d)
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    mask = None
    if padded:  # causal, and row 1 has its first two own keys masked (left padding)
        mask = torch.ones(q, s, dtype=torch.bool).tril(s - q)[None, None].repeat(b, 1, 1, 1)
        mask[1, :, :, : min(2, s - 1)] = False
    got = shared_prompt_attention(query, pk, pv, k, v, mask, 0.3)
    want = reference_attention(query, pk, pv, k, v, mask, 0.3)
    assert got.shape == (b, q, heads, d)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.fixture()
def tiny(tiny_model):
    return load_model(str(tiny_model)), load_tokenizer(str(tiny_model))


def test_the_tiny_model_takes_the_shared_path_and_the_fallback_agrees(tiny, monkeypatch):
    model, tok = tiny
    assert teacher_mod.supports_shared_prompt(model)
    calls = []
    original = teacher_mod.shared_prompt_attention
    monkeypatch.setattr(teacher_mod, "shared_prompt_attention", lambda *a: calls.append(1) or original(*a))
    t = CachedPromptTeacher(lambda: contextlib.nullcontext(model), tok, KIND.prompt, chat=True)
    suffixes = [t.suffix_ids(x) for x in TEXTS]
    shared = t.continuation_logits(suffixes, OUTS)
    assert len(calls) == model.config.num_hidden_layers  # one call per layer, one forward
    assert model.config._attn_implementation == "sdpa"  # switched back after the teacher's pass
    monkeypatch.setattr(teacher_mod, "supports_shared_prompt", lambda m: False)  # the per-batch copy path
    copied = t._forward(suffixes, OUTS)
    for row, out in enumerate(OUTS):
        assert torch.allclose(shared[row, : len(out)], copied[row, : len(out)], atol=1e-4)


def test_online_teacher_keeps_each_examples_logits_and_gives_the_same_values(tiny):
    model, tok = tiny
    memo = CachedPromptTeacher(lambda: contextlib.nullcontext(model), tok, KIND.prompt, chat=True, memo_mb=64)
    plain = CachedPromptTeacher(lambda: contextlib.nullcontext(model), tok, KIND.prompt, chat=True, memo_mb=0)
    suffixes = [memo.suffix_ids(x) for x in TEXTS]
    first = memo.continuation_logits(suffixes[:2], OUTS[:2])
    assert memo.computed == 2
    # A batch mixing a kept example and a new one, in another order: only the new one runs.
    mixed = memo.continuation_logits([suffixes[2], suffixes[0]], [OUTS[2], OUTS[0]])
    assert memo.computed == 3
    fresh = plain.continuation_logits([suffixes[2], suffixes[0]], [OUTS[2], OUTS[0]])
    assert torch.allclose(mixed, fresh, atol=1e-5)
    assert torch.equal(mixed[1, :4], first[0])
    again = memo.continuation_logits(suffixes, OUTS)
    assert memo.computed == 3  # a later epoch: the teacher does not run
    assert torch.allclose(again, plain.continuation_logits(suffixes, OUTS), atol=1e-5)
    assert plain.memo == {} and plain.computed == 5
