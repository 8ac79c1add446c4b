"""What a user sees, on one tiny run: stage summary lines, the report, the sample command, the list command."""
import contextlib
import html
import io
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.cli import ls as list_cmd
from pipeline.cli import sample
from pipeline.core import report
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.stages import paths
from tests.conftest import compose, tiny_overrides, write_tiny_data

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """The whole chain once on the tiny model; stdout kept for the summary lines."""
    root = tmp_path_factory.mktemp("user-facing")
    data = write_tiny_data(root / "data")
    cfg = compose(tiny_overrides(tiny_model, data, root / "outputs", "train.max_steps=6", "train.embedding_lr=0.05"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_stages(cfg)
    job = job_from_config(cfg)
    return SimpleNamespace(
        cfg=cfg, root=root, data=data, model=tiny_model, printed=printed.getvalue(),
        eval_dir=paths.output_dir("evaluate", cfg, job), train_dir=paths.output_dir("train", cfg, job),
    )


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the results table (the first table, the one with the 'tag' header)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| tag |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def assert_row_matches(row: list[str], data: dict, tag: str) -> None:
    m = data["metrics"]
    assert row[0] == f"`{tag}`"
    for cell, key, digits in (
        (row[1], "effect_kl", 4), (row[2], "residual_kl", 4), (row[3], "recovery", 3),
        (row[5], "drift_kl", 5), (row[7], "init_recovery", 3), (row[8], "train_recovery", 3),
    ):
        assert float(cell) == pytest.approx(m[key], abs=0.51 * 10**-digits), key
    low, high = (float(v) for v in row[4].split(" – "))
    assert (low, high) == (pytest.approx(m["recovery_ci"][0], abs=5.1e-4), pytest.approx(m["recovery_ci"][1], abs=5.1e-4))
    assert int(row[6]) == m["prompt_tokens_saved"]


def test_each_stage_prints_one_summary_line(run, capsys):
    lines = [l for l in run.printed.splitlines() if re.match(r"^(generate|extend|train|evaluate): ", l)]
    assert [l.split(":")[0] for l in lines] == ["generate", "extend", "train", "evaluate"]
    assert "teacher samples" in lines[0] and "added <kind> (id" in lines[1] and "6 steps" in lines[2]
    assert all(re.search(r" in \d+\.\ds -> ", l) for l in lines)
    assert lines[3].endswith("report.html") and "recovery" in lines[3]
    run_stages(run.cfg)  # everything exists now: each stage says it reused its folder
    again = [l for l in capsys.readouterr().out.splitlines() if re.match(r"^(generate|extend|train|evaluate): ", l)]
    assert len(again) == 4 and all("reused the finished output" in l for l in again)


def test_report_files_and_table_match_report_json(run):
    data = json.loads((run.eval_dir / "report.json").read_text())
    for name in ("report.md", "report.html", "plots/recovery.png", "plots/kl_per_position.png", "plots/loss.png"):
        assert (run.eval_dir / name).is_file(), name
    for png in (run.eval_dir / "plots").glob("*.png"):
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000
    markdown = (run.eval_dir / "report.md").read_text()
    (row,) = table_rows(markdown)
    assert_row_matches(row, data, "<kind>")
    for s in data["samples"]:  # samples side by side
        assert s["input"].split(" (")[0] in markdown

    # The HTML stands alone: every image inline, the same figures in its table.
    page = (run.eval_dir / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3 and "src='plots/" not in page
    results = page.split("<table class='results'>")[1].split("</table>")[0]
    cells = re.findall(r"<td class='num'>([^<]*)</td>", results)
    assert [html.unescape(c) for c in cells] == row[1:]

    # Per-position KL: the token-weighted mean over positions gives back the reported means.
    pp, m = data["per_position"], data["metrics"]
    total = sum(pp["count"])
    assert total == data["scored_tokens"]
    for key in ("effect_kl", "residual_kl", "init_residual_kl"):
        assert len(pp[key]) == len(pp["count"])
        assert sum(v * c for v, c in zip(pp[key], pp["count"])) / total == pytest.approx(m[key], rel=1e-4)


def test_combined_report_has_a_row_per_evaluation(run, tmp_path):
    other = tmp_path / "evaluate" / "other"
    shutil.copytree(run.eval_dir, other)
    data = json.loads((other / "report.json").read_text())
    data["tag"], data["tags"] = "<other>", ["<other>"]
    data["metrics"].update(recovery=0.5, residual_kl=data["metrics"]["effect_kl"] / 2)
    (other / "report.json").write_text(json.dumps(data))
    written = report.render([run.eval_dir, other], tmp_path / "combined")
    rows = table_rows(written["report.md"].read_text())
    assert_row_matches(rows[0], json.loads((run.eval_dir / "report.json").read_text()), "<kind>")
    assert_row_matches(rows[1], data, "<other>")
    assert written["recovery"].read_bytes().startswith(PNG)


def tag_loving_copy(train_dir, dest, tag_id: int):
    """The trained model with the tag's (tied) embedding row pointed along the final hidden states and scaled up,
    and the suppression dropped from its generation config: left alone, it writes the tag at every step."""
    model = AutoModelForCausalLM.from_pretrained(train_dir)
    tok = AutoTokenizer.from_pretrained(train_dir)
    ids = tok("How do I boil an egg? Write a poem about the sky.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_input_embeddings().weight[tag_id] = 200 * hidden / hidden.norm()
    model.generation_config.suppress_tokens = None
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return model


def test_sample_never_writes_a_tag(run, tmp_path):
    tag_id = AutoTokenizer.from_pretrained(run.train_dir).convert_tokens_to_ids("<kind>")
    saved = json.loads((run.train_dir / "generation_config.json").read_text())
    assert saved["suppress_tokens"] == [tag_id]  # plain transformers never samples a tag either

    loving = tag_loving_copy(run.train_dir, tmp_path / "loving", tag_id)
    tok = AutoTokenizer.from_pretrained(tmp_path / "loving")
    ids = tok("Explain why the sky looks blue.", return_tensors="pt")["input_ids"]
    unblocked = loving.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tag_id in unblocked[0, ids.shape[1] :].tolist()  # the control: this model does want to write it

    # The sampler knows the tag from the folder's manifests; with the tag-loving weights, whose generation config
    # no longer suppresses it, only the explicit suppression in Sampler.answer stands between the model and the tag.
    sampler = sample.Sampler(run.train_dir)
    sampler.model = loving
    for temperature in (0.0, 1.0):
        args = sample.SampleArgs(text="x", tags=["<kind>"], max_new_tokens=6, temperature=temperature)
        for text in ("Explain why the sky looks blue.", "Write a two line poem about autumn leaves."):
            for tags in (["<kind>"], []):
                answer, new_ids = sampler.answer(text, tags, args)
                assert tag_id not in new_ids and "<kind>" not in answer


def labels(printed: str) -> list[str]:
    """Which tags each printed answer was written with (an answer may span lines)."""
    return re.findall(r"^\[(no tag|<kind>)\] ", printed, re.M)


def test_sample_command_one_shot_and_interactive(run):
    out = io.StringIO()
    sample.main([f"model={run.train_dir}", "text=Hello, world: a text with commas", "tags=[<kind>]",
                 "compare=true", "max_new_tokens=4", "temperature=0"], out=out)
    assert labels(out.getvalue()) == ["no tag", "<kind>"]

    # No model given: the newest trained output holding the tag is found under outputs/train.
    out = io.StringIO()
    stdin = io.StringIO("How do I boil an egg?\n/tags <nope>\n/tags\nWhy is the sky blue?\n/quit\nnever read\n")
    sample.main(["tags=<kind>", "interactive=true", f"outputs={run.root / 'outputs'}", "max_new_tokens=3"],
                stream=stdin, out=out)
    text = out.getvalue()
    assert str(run.train_dir) in text.splitlines()[0]
    assert labels(text) == ["<kind>", "no tag"]
    assert "<nope>: not a metatoken" in text and "(it knows <kind>)" in text

    with pytest.raises(ConfigError, match="Did you mean tags"):
        sample.parse_args(["tag=<kind>", "text=hi"])
    with pytest.raises(ConfigError, match="is not a tag"):
        sample.parse_args(["tags=[kind]", "text=hi"])
    assert sample.parse_tags("[<a>,<b>]") == sample.parse_tags("<a><b>") == sample.parse_tags("<a> <b>") == ["<a>", "<b>"]
    with pytest.raises(ConfigError, match="no trained output under .* holds <pirate>"):
        sample.resolve_model("", ["<pirate>"], run.root / "outputs")


def test_list_shows_lengths_nesting_and_trained_outputs(run, tmp_path, capsys):
    conf = tmp_path / "conf" / "metatoken"
    conf.mkdir(parents=True)
    (conf / "kind.yaml").write_text('tag: "<kind>"\nprompt_file: prompts/kind.txt\ndescription: warm replies\n')
    (conf / "kind_pirate.yaml").write_text('tag: "<kind_pirate>"\nprompt: "Be <kind> and talk like a pirate."\n')
    (conf / "broken.yaml").write_text('tag: "no brackets"\nprompt: x\n')
    text = list_cmd.main(["--conf", str(tmp_path / "conf"), "--data", str(run.data),
                          "--outputs", str(run.root / "outputs"), "--tokenizer", str(run.model)])
    rows = {line.split()[0]: line for line in text.splitlines()[3:]}
    prompt = (run.data / "prompts" / "kind.txt").read_text().strip()
    n_tokens = len(AutoTokenizer.from_pretrained(run.model)(prompt, add_special_tokens=False)["input_ids"])
    assert rows["<kind>"].split()[1] == str(n_tokens) and "warm replies" in rows["<kind>"]
    assert run.train_dir.name in rows["<kind>"] and "(lora, kl)" in rows["<kind>"]
    assert "inside <kind_pirate>" in rows["<kind>"]
    assert "contains <kind>" in rows["<kind_pirate>"] and rows["<kind_pirate>"].rstrip().endswith("-")
    assert "ERROR" in rows["broken"] and "field 'tag'" in rows["broken"]
    assert "(prompt length in tokens" in text

    # The real conf/: every shipped metatoken is listed (words when the default tokenizer is not there).
    shipped = list_cmd.main(["--outputs", str(tmp_path / "none")])
    for tag in ("<nice>", "<pirate>", "<concise>", "<correct>", "<authoritative_tone>"):
        assert re.search(rf"^{tag}\s+\d+\s", shipped, re.M)


def test_report_goes_to_wandb_offline_and_a_wandb_failure_only_warns(run, tmp_path, monkeypatch, caplog):
    import wandb
    from omegaconf import OmegaConf

    folder = tmp_path / "outputs" / "evaluate" / run.eval_dir.name
    shutil.copytree(run.eval_dir, folder)
    logger = OmegaConf.create({"project": "metatokens", "wandb_mode": "offline"})
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    report.log_to_wandb(folder, logger)
    (run_dir,) = (tmp_path / "outputs" / "wandb").glob("offline-run-*")
    images = sorted(p.name.split("_0_")[0] for p in (run_dir / "files" / "media" / "images" / "report").glob("*.png"))
    assert images == ["kl_per_position", "loss", "recovery"]
    (table,) = (run_dir / "files" / "media" / "table" / "report").glob("samples*.table.json")
    inputs = [row[0] for row in json.loads(table.read_text())["data"]]
    assert inputs == [s["input"] for s in json.loads((folder / "report.json").read_text())["samples"]]

    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("no network")))
    report.log_to_wandb(folder, logger)
    assert "could not log the report (no network)" in caplog.text


def test_progress_switch_and_durations():
    from pipeline.runtime import progress

    try:
        progress.configure(True)
        assert not progress.tqdm(range(3), file=io.StringIO()).disable
        progress.configure(False)
        assert progress.tqdm(range(3)).disable
        progress.configure(None)  # automatic: pytest's stderr is not a terminal
        assert progress.tqdm(range(3)).disable
    finally:
        progress.configure(None)
    assert [progress.duration(s) for s in (4.24, 245, 3725)] == ["4.2s", "4m05s", "1h02m"]


def test_a_report_from_before_intervals_and_probes_still_renders(run, tmp_path):
    data = json.loads((run.eval_dir / "report.json").read_text())
    new = ("_ci", "train_", "probes", "pooled_sets")
    strip = lambda d: {k: v for k, v in d.items() if not any(n in k for n in new)}  # noqa: E731
    data["metrics"], data["sets"] = strip(data["metrics"]), [strip(s) for s in data["sets"]]
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps(data))
    report.render(old)
    markdown = (old / "report.md").read_text()
    (row,) = table_rows(markdown)
    assert row[4] == "n/a" and row[8] == "n/a" and float(row[3]) == pytest.approx(data["metrics"]["recovery"], abs=5e-4)
    assert "Behaviour probes" not in markdown and "training inputs (same scorer)" not in markdown
    assert "Behaviour probes" in (run.eval_dir / "report.md").read_text()  # the new report has them


def test_summary_line_of_a_run_with_several_sets_lists_each_beside_the_headline():
    from pipeline.runtime.progress import _what

    manifest = {"metrics": {"recovery": 0.25, "init_recovery": 0.0, "drift_kl": 0.001, "prompt_tokens_saved": 300},
                "sets": [{"tags": ["<a>"], "recovery": 0.1}, {"tags": ["<a>", "<b>"], "recovery": 0.4}]}
    assert _what("evaluate", manifest).startswith("recovery 0.250 over 2 sets [<a> 0.100, <a><b> 0.400] (untrained tag 0.000)")
    manifest["sets"] = manifest["sets"][:1]
    assert _what("evaluate", manifest).startswith("recovery 0.250 (untrained tag")
