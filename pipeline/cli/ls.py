"""List the metatokens defined in `conf/metatoken/`: prompt length, description, nesting, trained outputs.

    python -m pipeline.list
    python -m pipeline.list --outputs /data/runs/outputs --tokenizer outputs/train/pirate-1a2b3c4d5e
    python -m pipeline.list --remove-stale      # delete the .partial folders of crashed runs

It also lists unfinished `.partial` work folders that no running process holds (crashed or killed
runs). Re-running the same command resumes generate and train from them; `--remove-stale` deletes them.

Prompt length is counted in tokens of the default model's tokenizer when it is there (`make setup`
converts it), else in words. A metatoken nests others when its prompt names their tags; the trained
outputs are the complete folders under `<outputs>/train` whose model holds the tag.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from pipeline.core import catalog
from pipeline.runtime.outputs import stale_partials


def prompt_counter(tokenizer_path: str | Path | None):
    """(count function, unit): tokens of the given tokenizer, or words when there is none."""
    if tokenizer_path and Path(tokenizer_path, "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
        return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), f"tokens ({Path(tokenizer_path).name})"
    return (lambda text: len(text.split())), "words (no tokenizer found)"


def rows(definitions, trained, count) -> list[list[str]]:
    """One row per metatoken: tag, prompt length, description, nesting, trained outputs."""
    users = {}
    for d in definitions:
        for inner in d.contains:
            users.setdefault(inner, []).append(d.metatoken.tag)
    table = []
    for d in definitions:
        if d.metatoken is None:
            table.append([d.source.stem, "-", f"ERROR: {d.error}", "", ""])
            continue
        tag = d.metatoken.tag
        nesting = [f"contains {' '.join(d.contains)}"] if d.contains else []
        nesting += [f"inside {' '.join(users[tag])}"] if tag in users else []
        holders = [f"{o.path.name} ({o.train.get('params', '?')}, {o.train.get('objective', '?')})"
                   for o in trained if tag in o.tags]
        table.append([tag, str(count(d.metatoken.prompt)), d.description, "; ".join(nesting) or "-", ", ".join(holders) or "-"])
    return table


def format_table(headers: list[str], table: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *table]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *table]]
    return "\n".join(lines)


def stale_section(outputs_dir: str | Path, remove: bool) -> str:
    """The `.partial` folders no running process holds, with their sizes; removed with `remove`."""
    stale = stale_partials(outputs_dir)
    if not stale:
        return ""
    lines = []
    for partial in stale:
        size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
        if remove:
            shutil.rmtree(partial)
        lines.append(f"  {partial} ({size / 1e6:.1f} MB){' - removed' if remove else ''}")
    hint = "" if remove else "\nRe-run the same command to resume one, or `python -m pipeline.list --remove-stale` to delete them."
    return f"\n\nunfinished work folders no running process holds ({len(stale)}):\n" + "\n".join(lines) + hint


def main(argv: list[str] | None = None) -> str:
    paths = catalog.default_paths()
    parser = argparse.ArgumentParser(prog="python -m pipeline.list", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", default=str(Path(paths["root"]) / "conf"), help="the config root (holds metatoken/)")
    parser.add_argument("--data", default=paths["data"], help="where prompt_file paths are relative to")
    parser.add_argument("--outputs", default=paths["outputs"], help="the pipeline's outputs folder")
    parser.add_argument("--tokenizer", default=str(Path(paths["models"]) / "smollm2-135m-instruct"),
                        help="tokenizer to count prompt tokens with (default: the default model's)")
    parser.add_argument("--remove-stale", action="store_true", help="delete the .partial folders of crashed runs")
    args = parser.parse_args(argv)
    count, unit = prompt_counter(args.tokenizer)
    definitions = catalog.definitions(args.conf, args.data)
    trained = catalog.trained_outputs(args.outputs)
    text = (
        f"metatokens in {Path(args.conf) / 'metatoken'} (prompt length in {unit}); "
        f"{len(trained)} trained output(s) under {Path(args.outputs) / 'train'}\n\n"
        + format_table(["tag", "prompt", "description", "nesting", "trained outputs"], rows(definitions, trained, count))
        + stale_section(args.outputs, args.remove_stale)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
