"""Stage components on the tiny model: extension keeps old behaviour, the prompt cache changes nothing."""
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.core.formats import context_ids
from pipeline.core.metatokens import Metatoken
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.sampling import sample_all
from pipeline.core.teacher import shared_prefix_length
from pipeline.errors import ConfigError
from pipeline.stages import paths
from pipeline.stages.extend import add_tag_tokens, extend_model, initial_rows


def gen_config(**fields):
    """A generate config with every field the schema has (defaults for those not given)."""
    from pipeline.config import GenerateConfig

    return OmegaConf.structured(GenerateConfig(**fields))


KIND = Metatoken(tag="<kind>", prompt="You are a kind and warm assistant who always encourages the user.", source="test")


@pytest.fixture()
def tiny(tiny_model):
    return load_model(str(tiny_model)), load_tokenizer(str(tiny_model))


def test_tag_is_one_new_token_and_old_ids_are_unchanged(tiny):
    model, tok = tiny
    text = "How do I boil an egg? Arr matey."
    before_vocab, before_ids = dict(tok.get_vocab()), tok(text)["input_ids"]
    ids = extend_model(model, tok, [KIND, Metatoken("<pirate>", "Talk like a pirate.", "test")], "prompt_mean")
    assert ids == {"<kind>": len(before_vocab), "<pirate>": len(before_vocab) + 1}
    assert tok("<kind>", add_special_tokens=False)["input_ids"] == [ids["<kind>"]]
    assert tok(f"<kind>{text}", add_special_tokens=False)["input_ids"] == [ids["<kind>"], *before_ids]
    assert tok(text)["input_ids"] == before_ids
    assert all(tok.get_vocab()[t] == i for t, i in before_vocab.items())
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.decode([ids["<kind>"], *before_ids], skip_special_tokens=True) == text


def test_untagged_outputs_are_unchanged_after_extend(tiny, tiny_model):
    model, tok = tiny
    reference = load_model(str(tiny_model))
    ids = torch.tensor([context_ids(tok, "Explain why the sky looks blue.", None, chat=True)])
    old_vocab = len(tok)
    extend_model(model, tok, [KIND], "prompt_mean")
    with torch.no_grad():
        before, after = reference(ids).logits, model(ids).logits
    assert torch.equal(before, after[..., :old_vocab])  # same logits on every old token, bit for bit
    assert torch.softmax(after, -1)[..., old_vocab:].max() < 0.05  # and little mass on the tag


def test_prompt_mean_init_is_the_mean_of_prompt_embeddings(tiny):
    model, tok = tiny
    weight = model.get_input_embeddings().weight.detach().clone()
    prompt_ids = tok(KIND.prompt, add_special_tokens=False)["input_ids"]
    ids = extend_model(model, tok, [KIND], "prompt_mean")
    assert torch.allclose(model.get_input_embeddings().weight[ids["<kind>"]], weight[prompt_ids].mean(0))
    assert torch.allclose(initial_rows(weight, [[0, 1]], "vocab_mean")[0], weight.mean(0))
    with pytest.raises(ConfigError, match="extend.init is 'zeros'"):
        initial_rows(weight, [[0]], "zeros")


def test_tag_that_already_exists_is_rejected(tiny):
    _, tok = tiny
    with pytest.raises(ConfigError, match=r"already exist in the tokenizer's vocabulary.*Fix: rename"):
        add_tag_tokens(tok, ["<|im_end|>"])


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1  # each context keeps at least one token to feed
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


@pytest.mark.parametrize("temperature", [0.8, 1.0])
def test_prompt_cache_gives_the_same_samples_and_logprobs_as_the_naive_path(tiny, temperature):
    model, tok = tiny
    texts = ["How do I boil an egg?", "Write a two line poem about autumn leaves please.", "Why?", "Explain the sky."]
    contexts = [context_ids(tok, t, KIND.prompt, chat=True) for t in texts]
    assert shared_prefix_length(contexts) > 10
    base = dict(temperature=temperature, top_p=0.95, max_new_tokens=8, logprobs_top_k=5, batch_size=3, seed=3)
    naive = sample_all(model, tok, contexts, gen_config(**base, prompt_cache=False), "naive")
    cached = sample_all(model, tok, contexts, gen_config(**base, prompt_cache=True), "cached")
    for a, b in zip(naive, cached):
        assert a["output_ids"] == b["output_ids"]
        assert a["topk_ids"] == b["topk_ids"]
        assert torch.allclose(torch.tensor(a["topk_logprobs"]), torch.tensor(b["topk_logprobs"]), atol=1e-4)


def test_recorded_logprobs_are_the_models_own_distribution(tiny):
    """The top-k recorded while sampling equal a separate teacher-forced pass over the same tokens."""
    model, tok = tiny
    ctx = context_ids(tok, "How do I boil an egg?", KIND.prompt, chat=True)
    cfg = gen_config(temperature=0.7, top_p=0.9, max_new_tokens=6, logprobs_top_k=4, batch_size=1, seed=0)
    sample = sample_all(model, tok, [ctx], cfg, "one")[0]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + sample["output_ids"]])).logits[0, len(ctx) - 1 : -1]
    top, ids = torch.log_softmax(logits, -1).topk(4, dim=-1)
    assert ids.tolist() == sample["topk_ids"]
    assert torch.allclose(top, torch.tensor(sample["topk_logprobs"]), atol=1e-4)


def test_cached_prompt_teacher_matches_reading_the_whole_prompt(tiny):
    import contextlib

    from pipeline.core.scoring import continuation_logits
    from pipeline.core.teacher import CachedPromptTeacher

    model, tok = tiny
    teacher = CachedPromptTeacher(lambda: contextlib.nullcontext(model), tok, KIND.prompt, chat=True)
    assert len(teacher.prompt_kv) > 10
    texts = ["How do I boil an egg?", "Write a two line poem about autumn leaves please."]
    outs = [[5, 6, 7, 8], [9, 10]]
    cached = teacher.continuation_logits([teacher.suffix_ids(t) for t in texts], outs)
    full = continuation_logits(model, [context_ids(tok, t, KIND.prompt, True) for t in texts], outs, tok.pad_token_id, 2, "x")
    assert torch.allclose(cached[0, :4], full[0], atol=1e-4)
    assert torch.allclose(cached[1, :2], full[1], atol=1e-4)


def test_online_teacher_trains_end_to_end(tiny_cfg):
    import json

    from pipeline.__main__ import run_stages
    from pipeline.core.job import job_from_config

    cfg = tiny_cfg("train.teacher=online", "train.max_steps=4", "train.embedding_lr=0.05")
    run_stages(cfg)
    m = json.loads((paths.output_dir("evaluate", cfg, job_from_config(cfg)) / "report.json").read_text())["metrics"]
    assert m["residual_kl"] < m["init_residual_kl"]


def test_scoring_builds_no_autograd_graph(tiny):
    """Evaluation scores thousands of positions; holding their graphs once ran a real run out of memory."""
    from pipeline.core.scoring import continuation_logits

    model, tok = tiny
    ctx = [context_ids(tok, "How do I boil an egg?", KIND.prompt, chat=True)]
    logits = continuation_logits(model, ctx, [[5, 6, 7]], tok.pad_token_id, 1, "x")
    assert not logits[0].requires_grad and logits[0].grad_fn is None
