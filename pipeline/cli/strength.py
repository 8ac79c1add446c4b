"""`python -m pipeline.strength from=outputs/train/<folder>`: the tag-strength sweep (core/strength.py) on a finished
train output, written as a Markdown page with its plot and raw figures (default docs/strength.md).
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.cli import port
from pipeline.core import guidance
from pipeline.core.catalog import tags_of
from pipeline.core.job import job_from_config
from pipeline.core.models import load_model, load_tokenizer, resolve_model_path
from pipeline.core.strength import (
    DEFAULT_STRENGTHS,
    EXPLANATION,
    TABLE_HEADERS,
    USAGE,
    check,
    plot,
    reference_text,
    sweep,
    table_rows,
)
from pipeline.errors import ConfigError
from pipeline.runtime import outputs
from pipeline.stages import evaluate, paths


def parse(argv: list[str]) -> dict:
    """from=<train folder> [strengths=[...]] [out=docs/strength.md] [work=outputs/strength] [source="<overrides>"]."""
    args = {"from": None, "strengths": None, "out": "docs/strength.md", "work": "outputs/strength", "source": ""}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in args:
            raise ConfigError(f"strength: {arg!r} is not one of {', '.join(k + '=' for k in args)}. "
                              "Fix: e.g. python -m pipeline.strength from=outputs/train/pirate-<hash>.")
        args[key] = value
    if not args["from"]:
        raise ConfigError("strength: needs from=outputs/train/<folder> (a finished train output).")
    items = [v for v in args["strengths"].strip("[]").split(",") if v.strip()] if args["strengths"] is not None else DEFAULT_STRENGTHS
    args["strengths"] = [guidance.check_strength(v.strip() if isinstance(v, str) else v, f"strengths item {v!r}") for v in items]
    if not args["strengths"]:
        raise ConfigError("strength: strengths= is empty. Fix: e.g. strengths=[-1,0,1,2].")
    return args


def run_from(folder: Path, strengths: list[float], work_root: Path, made_by: list[str] = ()) -> dict:
    """The sweep on a finished train output, reading (never writing) its outputs folder."""
    folder = folder.resolve()
    cfg = port.source_config(folder, list(made_by))  # the config it ran with, checked to name this folder again
    cfg = OmegaConf.merge(cfg, {"paths": {"outputs": str(folder.parent.parent)}, "evaluate": {"strengths": strengths}})
    job = job_from_config(cfg)
    check(cfg, job)
    if paths.output_dir("train", cfg, job) != folder:
        raise ConfigError(f"strength: {folder} is not where its config puts its train output. Fix: give the folder as the pipeline wrote it.")
    gen_dir = paths.output_dir("generate", cfg, job)
    outputs.require({"generate": gen_dir}, by="strength")
    heldout, _ = evaluate.load_rows(OmegaConf.merge(cfg, {"evaluate": {"train_examples": 0}}), job, gen_dir)
    first = job.eval_sets[0]
    base_path = resolve_model_path(cfg.model)
    base_tok = load_tokenizer(base_path)
    base = load_model(base_path, cfg.model.dtype, cfg.model.device)
    ref = evaluate.reference_scores(base, base_tok, job, {first: heldout[first]}, cfg, "heldout")[first]
    del base
    tag_ids = sorted(load_tokenizer(str(folder)).convert_tokens_to_ids(t) for t in tags_of(folder))
    key = {"train": folder.name, "generate": gen_dir.name, "settings": outputs.plain(cfg.generate), "seed": cfg.evaluate.seed,
           "rows": [r["id"] for r in heldout[first]]}
    work = work_root / f"{folder.name}-{outputs.key_hash(key)}"
    result = sweep(cfg, job, heldout[first], ref, base_path, folder, tag_ids, strengths, work)
    result.update(train=str(folder), generate=str(gen_dir), model=cfg.model.name)
    return result


def write_doc(result: dict, out: Path, command: str) -> Path:
    """out (Markdown), with <out stem>/<stem>.png and <stem>.json beside it."""
    assets = out.parent / out.stem
    assets.mkdir(parents=True, exist_ok=True)
    outputs.write_json(assets / f"{out.stem}.json", result)
    png = plot(result, assets / f"{out.stem}.png")
    lines = [f"# Tag strength: `{result['tag']}` from weaker to negated to stronger", "",
             f"Made by `{command}` on `{Path(result['train']).name}` (model `{result['model']}`, "
             f"{result['heldout_examples']} held-out inputs; the raw figures: [{assets.name}/{assets.name}.json]({assets.name}/{assets.name}.json)).", "",
             "| " + " | ".join(TABLE_HEADERS) + " |", "|---|" + "---:|" * (len(TABLE_HEADERS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", EXPLANATION, "", reference_text(result), "", f"![Tag strength]({assets.name}/{png.name})", "", USAGE, "",
              "## Guided answers", "", f"Sampled at temperature {result['sampling']['temperature']}, top-p {result['sampling']['top_p']}, "
              f"up to {result['sampling']['max_new_tokens']} tokens, the same seed per input at every strength.", ""]
    for example in result["examples"]:
        lines += [f"**Input:** {example['input']}", "", "| s | answer |", "|---:|---|"]
        lines += [f"| {s} | {' '.join(text.split()).replace('|', chr(92) + '|')} |" for s, text in example["answers"].items()]
        lines.append("")
    outputs.write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run_from(Path(args["from"]), args["strengths"], Path(args["work"]), shlex.split(args["source"]))
    out = write_doc(result, Path(args["out"]), "python -m pipeline.strength " + " ".join(shlex.quote(a) for a in argv))
    print(out.read_text())


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        sys.exit(f"error: {err}")
