"""The steering-vector study's helpers (pipeline/steering.py), checked against independent computations
on a tiny model: the vector against an unbatched loop over `hidden_states`, the hook against the same
shift built into the weights (a bias on the layer's last projection), the scores against a plain loop."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.core.formats import context_ids
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.steering import Heldout, mean_differences, scores, steering
from pipeline.errors import ConfigError
from tests.conftest import build_tiny_model, next_token_logprobs, plain_kl

PROMPT = "You are a kind and warm assistant who always encourages the user."
INPUTS = ["How do I boil an egg?", "Explain why the sky looks blue during the day.", "Write a poem.", "What is a fox?"]


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-3"), layers=3)
    return load_tokenizer(str(path)), load_model(str(path), "float32", "cpu"), path


def contexts(tok, prompt):
    return [context_ids(tok, text, prompt, True) for text in INPUTS]


def answers(seed: int = 0):
    """Answers of different lengths (so batches are padded), ids from the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (n,), generator=gen).tolist() for n in (5, 3, 7, 2)]


def with_bias(path, layer: int, shift: torch.Tensor):
    """The model with `shift` added to the output of block `layer - 1` at every position, in its weights:
    the block ends with h + down_proj(...), so a bias on down_proj adds a constant to its output."""
    model = load_model(str(path), "float32", "cpu")
    block = model.model.layers[layer - 1].mlp
    old = block.down_proj
    block.down_proj = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        block.down_proj.weight.copy_(old.weight)
        block.down_proj.bias.copy_(shift)
    return model


@pytest.mark.parametrize("positions", ["answer", "last"])
def test_mean_differences_match_an_unbatched_loop_over_hidden_states(three_layers, positions):
    tok, model, _ = three_layers
    with_ctx, without_ctx, outs = contexts(tok, PROMPT), contexts(tok, None), answers()
    got = mean_differences(model, with_ctx, without_ctx, outs, [1, 2], tok.pad_token_id, batch_size=3, positions=positions)
    for layer in (1, 2):
        diffs, norms = [], []
        for a, b, out in zip(with_ctx, without_ctx, outs):
            with torch.no_grad():
                h_with = model(torch.tensor([a + out]), output_hidden_states=True).hidden_states[layer][0]
                h_without = model(torch.tensor([b + out]), output_hidden_states=True).hidden_states[layer][0]
            steps = range(len(out)) if positions == "answer" else range(1)  # positions predicting answer tokens
            for t in steps:
                diffs.append(h_with[len(a) - 1 + t] - h_without[len(b) - 1 + t])
                norms.append(h_without[len(b) - 1 + t].norm().item())
        assert got["positions"] == len(diffs) == (17 if positions == "answer" else 4)
        torch.testing.assert_close(got["vectors"][layer], torch.stack(diffs).mean(0), atol=1e-5, rtol=1e-4)
        assert got["norms"][layer] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    assert got["vectors"][1].norm() > 0.1  # the prompt does change the residual stream (a zero vector would pass the rest)


def test_steering_adds_the_vector_at_every_position_and_is_removed_after(three_layers):
    tok, model, path = three_layers
    torch.manual_seed(1)
    vector, layer, scale = torch.randn(model.config.hidden_size), 2, 2.5
    ids = torch.tensor([contexts(tok, None)[1] + answers()[0]])
    with torch.no_grad():
        plain = model(ids).logits
        with steering(model, vector, layer, scale):
            steered = model(ids).logits
        after = model(ids).logits
        reference = with_bias(path, layer, scale * vector)(ids).logits
    torch.testing.assert_close(steered, reference, atol=1e-4, rtol=1e-4)
    assert (steered - plain).abs().max() > 0.1  # the shift changes the output, so the comparison above means something
    assert torch.equal(after, plain)  # the hook is gone


def test_steered_scores_match_a_plain_loop(three_layers):
    """Recovery and drift of a steered model, against per-position full-vocabulary KLs summed by hand."""
    tok, model, path = three_layers
    eval_cfg = SimpleNamespace(resamples=200, seed=0)
    teacher_ctx, plain_ctx = contexts(tok, PROMPT), contexts(tok, None)
    teacher_outs, base_outs = answers(0), answers(1)
    from pipeline.core.scoring import continuation_logits, token_kls

    teacher = continuation_logits(model, teacher_ctx, teacher_outs, tok.pad_token_id, 2, "teacher")
    base_on_teacher = continuation_logits(model, plain_ctx, teacher_outs, tok.pad_token_id, 2, "base")
    heldout = Heldout(teacher_outs, teacher, token_kls(teacher, base_on_teacher), base_outs,
                      continuation_logits(model, plain_ctx, base_outs, tok.pad_token_id, 2, "base own"))
    vector = mean_differences(model, teacher_ctx, plain_ctx, teacher_outs, [1], tok.pad_token_id)["vectors"][1]
    with steering(model, vector, 1, 4.0):
        got = scores(model, plain_ctx, plain_ctx, heldout, tok.pad_token_id, eval_cfg, batch_size=3)

    steered = with_bias(path, 1, 4.0 * vector)
    effect = residual = drift = 0.0
    drift_tokens = 0
    for t_ctx, p_ctx, t_out, b_out in zip(teacher_ctx, plain_ctx, teacher_outs, base_outs):
        p = next_token_logprobs(model, t_ctx, t_out)
        effect += sum(plain_kl(p, next_token_logprobs(model, p_ctx, t_out)))
        residual += sum(plain_kl(p, next_token_logprobs(steered, p_ctx, t_out)))
        drift += sum(plain_kl(next_token_logprobs(model, p_ctx, b_out), next_token_logprobs(steered, p_ctx, b_out)))
        drift_tokens += len(b_out)
    assert got["recovery"] == pytest.approx(1 - residual / effect, abs=1e-4)
    assert got["drift_kl"] == pytest.approx(drift / drift_tokens, rel=1e-3)
    assert got["recovery_ci"][0] <= got["recovery"] <= got["recovery_ci"][1]
    assert drift > 1e-3  # a real shift: the plain-loop comparison is not 0 == 0

    with steering(model, vector, 1, 0.0):  # no shift, batched as the reference was: exactly the base model
        zero = scores(model, plain_ctx, plain_ctx, heldout, tok.pad_token_id, eval_cfg, batch_size=2)
    assert zero["recovery"] == 0.0 and zero["drift_kl"] == 0.0


@pytest.mark.parametrize("layer", [0, 3])
def test_a_layer_outside_the_residual_stream_fails_naming_the_range(three_layers, layer):
    tok, model, _ = three_layers
    with pytest.raises(ConfigError, match=r"Fix: pick a layer in 1\.\.2"):
        with steering(model, torch.zeros(model.config.hidden_size), layer, 1.0):
            pass
    with pytest.raises(ConfigError, match="Fix: pick a layer"):
        mean_differences(model, contexts(tok, PROMPT), contexts(tok, None), answers(), [layer], tok.pad_token_id)


def test_unknown_positions_fail(three_layers):
    tok, model, _ = three_layers
    with pytest.raises(ConfigError, match="Fix: use one of answer, last"):
        mean_differences(model, contexts(tok, PROMPT), contexts(tok, None), answers(), [1], tok.pad_token_id, positions="all")


def test_the_study_reproduces_the_evaluate_report_on_a_tiny_run(tiny_cfg, tiny_model, tiny_data, tmp_path, monkeypatch):
    """benchmarks/steering.py on a finished tiny chain: its own scoring of the trained tag gives the evaluate
    report's recovery and drift (so the vector is scored like the tag), a zero scale recovers nothing, and
    the table and plot are written."""
    import importlib.util
    import json

    from pipeline.__main__ import run_stages
    from tests.conftest import tiny_overrides

    run_stages(tiny_cfg("stage=all"))
    spec = importlib.util.spec_from_file_location("steering_study", Path(__file__).resolve().parents[2] / "benchmarks" / "steering.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(study, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(study, "CACHE", tmp_path / "cache")
    overrides = tiny_overrides(tiny_model, tiny_data, tmp_path / "outputs")
    study.main(["run", *overrides, "--layers", "1", "--scales", "0,2", "--probe"])

    results = json.loads((tmp_path / "results.json").read_text())
    tag, report = results["references"]["tag"], results["references"]["tag"]["report"]
    assert tag["recovery"] == pytest.approx(report["recovery"], abs=1e-6)
    assert tag["drift_kl"] == pytest.approx(report["drift_kl"], rel=1e-5, abs=1e-9)
    assert results["setup"]["effect_kl"] == pytest.approx(report["effect_kl"], rel=1e-6)
    zero, two = results["cells"]["answer/L1/x0"], results["cells"]["answer/L1/x2"]
    assert zero["recovery"] == 0.0 and zero["drift_kl"] == 0.0
    assert two["drift_kl"] > 1e-4 and two["recovery"] != 0.0
    assert two["command"].endswith("--positions answer --layers 1 --scales 2 --probe")
    assert len(two["samples"]) == 2
    before = (tmp_path / "results.json").read_text()
    study.main(["run", *overrides, "--layers", "1", "--scales", "2"])  # finished cells are not run again
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == json.loads(before)["cells"]

    study.main(["table"])
    table = (tmp_path / "docs" / "table.md").read_text()
    assert table.count("\n") == 2 + 2 + 2  # header, the prompt and the tag, two cells
    assert (tmp_path / "docs" / "recovery.png").stat().st_size > 10_000
