"""Tag strength (classifier-free guidance): the math against a brute-force combination, the sampler against
plain full-context forwards and transformers' own `generate(guidance_scale=...)`, and the sample command."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import sample
from pipeline.core import guidance
from pipeline.errors import ConfigError

TAGS = ["<kind>", "<rude>"]
TEXTS = ["How do I boil an egg?", "Write a two line poem about autumn leaves, please.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def tagged_model(tiny_model):
    """The tiny model with two tags added (random rows): enough for guidance, which needs no training."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": TAGS})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        model.get_input_embeddings().weight[-len(TAGS):] = torch.randn(len(TAGS), model.config.hidden_size) * 0.5
    return model.eval(), tok


def brute_logits(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """[T, V] next-token logits, one full forward per position: no batch, no padding, no cache."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([context + continuation[:t]])).logits[0, -1].double()
                            for t in range(len(continuation) + 1)])


def test_combine_equals_the_brute_force_formula():
    torch.manual_seed(0)
    u, t1, t2 = (torch.randn(5, 11) * 3 for _ in range(3))
    for strengths in ([2.0], [-1.0], [0.5], [3.0, -1.0], [0.5, 1.5]):
        tagged = [t1, t2][: len(strengths)]
        expected = u.double() + sum(s * (t.double() - u.double()) for s, t in zip(strengths, tagged))
        got = guidance.combine([u, *tagged], guidance.branch_weights(strengths))
        assert torch.allclose(got.double(), expected, atol=1e-5)
        # the distribution: log_softmax of the combined logits, independent of the logits' normalisation
        shifted = [x + 7.0 for x in (u, *tagged)]
        assert torch.allclose(guidance.guided_logprobs(shifted, guidance.branch_weights(strengths)).double(),
                              torch.log_softmax(expected, -1), atol=1e-5)


def test_zero_and_one_give_the_untagged_and_tagged_logits_exactly():
    torch.manual_seed(0)
    u, t1, t2 = (torch.randn(4, 9) for _ in range(3))
    assert torch.equal(guidance.combine([u, t1], guidance.branch_weights([0.0])), u)
    assert torch.equal(guidance.combine([u, t1], guidance.branch_weights([1.0])), t1)
    assert torch.equal(guidance.combine([u, t1, t2], guidance.branch_weights([0.0, 1.0])), t2)
    assert torch.equal(guidance.combine([u, t1, t2], guidance.branch_weights([0.0, 0.0])), u)


def test_negative_strength_moves_away_from_the_tag(tagged_model):
    model, tok = tagged_model
    u_ctx, t_ctx = guidance.branch_contexts(tok, TEXTS[0], ["<kind>"], chat=True)
    u, t = brute_logits(model, u_ctx, [])[0], brute_logits(model, t_ctx, [])[0]
    tagged = torch.log_softmax(t, -1)

    def kl_to_tagged(s):
        q = guidance.guided_logprobs([u, t], guidance.branch_weights([s])).double()
        return float((tagged.exp() * (tagged - q)).sum())

    kls = {s: kl_to_tagged(s) for s in (-1.0, 0.0, 0.5, 1.0)}
    assert kls[1.0] == pytest.approx(0.0, abs=1e-6)  # float32 guided vs float64 tagged
    assert kls[-1.0] > kls[0.0] > kls[0.5] > 1e-4  # further from the tag the lower s goes below 1
    # the token the tag raises most (over the untagged context) loses probability at s = -1
    raised = int((tagged - torch.log_softmax(u, -1)).argmax())
    for s, lower in ((-1.0, 0.0), (0.0, 1.0)):
        p = lambda x: guidance.guided_logprobs([u, t], guidance.branch_weights([x]))[raised]  # noqa: E731
        assert p(s) < p(lower)


def test_untagged_and_tagged_contexts_differ_only_by_the_tag_tokens(tagged_model):
    _, tok = tagged_model
    tag_ids = tok.convert_tokens_to_ids(TAGS)
    for chat in (True, False):
        for text in TEXTS + ["a text that writes <kind> itself"]:
            untagged, *tagged = guidance.branch_contexts(tok, text, TAGS, chat)
            for tag_id, ctx in zip(tag_ids, tagged):
                assert ctx.count(tag_id) == 1 and len(ctx) == len(untagged) + 1
                assert [i for i in ctx if i != tag_id] == untagged
    # the chat template's default system prompt is not in the untagged branch: it is more than the tag
    assert "You are a helpful assistant" not in tok.decode(guidance.branch_contexts(tok, "Hi", [], True)[0])


def guided_greedy_by_brute_force(model, contexts: list[list[int]], strengths, steps: int) -> list[int]:
    """Greedy guided decoding for one input, each step a full forward of every branch (no cache, no padding)."""
    weights, new = guidance.branch_weights(strengths), []  # noqa: F841
    for _ in range(steps):
        with torch.no_grad():
            logits = [model(torch.tensor([c + new])).logits[0, -1].double() for c in contexts]
        combined = logits[0] + sum(s * (x - logits[0]) for s, x in zip(strengths, logits[1:]))
        new.append(int(combined.argmax()))
    return new


def test_sampler_matches_brute_force_guided_decoding_with_several_tags_in_a_batch(tagged_model):
    model, tok = tagged_model
    strengths = [2.0, -1.0]
    contexts = [guidance.branch_contexts(tok, text, TAGS, True) for text in TEXTS]
    branches = [[c[k] for c in contexts] for k in range(len(TAGS) + 1)]  # different lengths: left padding
    got = guidance.sample(model, branches, guidance.branch_weights(strengths), pad_id=tok.pad_token_id, eos_ids=[],
                          max_new_tokens=6, temperature=0.0, top_p=1.0, seeds=[0, 1, 2])
    assert got == [guided_greedy_by_brute_force(model, c, strengths, 6) for c in contexts]


def test_one_tag_one_input_matches_transformers_guidance_scale(tagged_model):
    model, tok = tagged_model
    untagged, tagged = guidance.branch_contexts(tok, TEXTS[1], ["<kind>"], True)
    plain_tagged = model.generate(torch.tensor([tagged]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                  pad_token_id=tok.pad_token_id)[0, len(tagged):].tolist()
    for s in (2.0, -1.0, 0.5):
        ours = guidance.sample(model, [[untagged], [tagged]], guidance.branch_weights([s]), pad_id=tok.pad_token_id,
                               eos_ids=[], max_new_tokens=8, temperature=0.0, top_p=1.0, seeds=[0])[0]
        theirs = model.generate(torch.tensor([tagged]), guidance_scale=s, negative_prompt_ids=torch.tensor([untagged]),
                                do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=tok.pad_token_id)
        assert ours == theirs[0, len(tagged):].tolist()
        if s != 0.5:
            assert ours != plain_tagged  # guidance changed the answer, so the agreement is not plain decoding twice
    # s = 1 and s = 0: plain generation from the tagged and from the untagged context
    for s, context in ((1.0, tagged), (0.0, untagged)):
        ours = guidance.sample(model, [[untagged], [tagged]], guidance.branch_weights([s]), pad_id=tok.pad_token_id,
                               eos_ids=[], max_new_tokens=8, temperature=0.0, top_p=1.0, seeds=[0])[0]
        plain = model.generate(torch.tensor([context]), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=tok.pad_token_id)
        assert ours == plain[0, len(context):].tolist()


def test_batching_gives_the_same_samples_as_one_at_a_time(tagged_model):
    model, tok = tagged_model
    contexts = [guidance.branch_contexts(tok, text, ["<kind>"], True) for text in TEXTS]
    branches = [[c[k] for c in contexts] for k in range(2)]
    settings = dict(pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=10, temperature=1.0, top_p=0.95,
                    suppress_ids=tok.convert_tokens_to_ids(TAGS))
    weights = guidance.branch_weights([2.5])
    together = guidance.sample_batched(model, branches, weights, batch_size=3, seeds=[5, 6, 7], **settings)
    alone = [guidance.sample(model, [[b[i]] for b in branches], weights, seeds=[5 + i], **settings)[0] for i in range(3)]
    assert together == alone
    assert len(set(map(tuple, together))) > 1  # the inputs really were sampled differently
    tag_ids = set(settings["suppress_ids"])
    assert not any(t in tag_ids for row in together for t in row)  # tags are never written, guided or not


def test_bad_strengths_fail_clearly_before_any_model_loads(no_weights):
    for bad in ("abc", "nan", "inf", "-inf", ""):
        with pytest.raises(ConfigError, match="strength"):
            guidance.check_strength(bad, "strength")
    with pytest.raises(ConfigError, match="strength=nan|not a finite number"):
        sample.main(["text=hi", "tags=<pirate>", "strength=nan"])
    with pytest.raises(ConfigError, match="expected a float"):
        sample.main(["text=hi", "tags=<pirate>", "strength=lots"])
    with pytest.raises(ConfigError, match="not a number"):
        sample.main(["text=hi", "tags=[<pirate>:lots]"])
    with pytest.raises(ConfigError, match="not a finite number"):
        sample.main(["text=hi", "tags=[<pirate>:nan]"])
    with pytest.raises(ConfigError, match="one strength to several tags"):
        sample.parse_args(["text=hi", "tags=[<a><b>:2]"])
    assert guidance.check_strength("-1.5", "x") == -1.5 and math.isfinite(guidance.check_strength(3, "x"))


def test_sample_arguments_with_strengths_and_old_invocations():
    args = sample.parse_args(["text=hi", "tags=[<pirate>:2,<nice>:-1,<kind>]", "strength=0.5"])
    assert args.tags == ["<pirate>", "<nice>", "<kind>"]
    assert args.strengths(args.tags) == [2.0, -1.0, 0.5]
    old = sample.parse_args(["text=hi", "tags=[<pirate>,<nice>]"])
    assert old.tags == ["<pirate>", "<nice>"] and old.strengths(old.tags) == [1.0, 1.0]
    assert sample.parse_args(["text=hi", "tags=<pirate>", "strength=2"]).strengths(["<pirate>"]) == [2.0]
    with pytest.raises(ConfigError, match="Did you mean"):
        sample.parse_args(["text=hi", "tag_strengths=x"])  # filled from tags=, not a key
