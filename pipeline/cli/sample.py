"""Try a trained metatoken: answer a text with any of the model's tags, once or interactively.

    python -m pipeline.sample tags="[<pirate>]" text="How do I boil an egg?"         # newest output holding <pirate>
    python -m pipeline.sample model=outputs/train/pirate-1a2b3c4d5e text="Hi" tags="[<pirate>]" compare=true
    python -m pipeline.sample model=pirate interactive=true                          # newest outputs/train/pirate-*
    python -m pipeline.sample tags="[<pirate>]" strength=2 text="Hi"                 # more pirate than the tag alone
    python -m pipeline.sample tags="[<pirate>:2,<nice>:-1]" text="Hi"                # per-tag strengths: <nice> negated

Arguments are `key=value` like the pipeline's Hydra overrides, but parsed with argparse and taken
literally, so a text may hold commas, colons and quotes. Keys: see `python -m pipeline.sample -h`.
In interactive mode each line on stdin is a request; `/tags <a> <b>:2` switches tags (and strengths) (`/tags` alone: none),
`/compare` toggles the untagged answer, `/quit` or end of input stops.
A tag's strength s (default 1: the plain tag) applies it by classifier-free guidance (pipeline/guidance.py):
logits = untagged + sum_i s_i (tagged_i - untagged), each tag in its own context; 0 is no tag, above 1 more of it,
below 0 its opposite. When every strength is 1 the tags are read together in one context, as before.
The model never writes a tag: every tag it knows is suppressed at generation (its saved generation
config does the same), so tags only ever appear where the user puts them.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TextStreamer

from pipeline.core import catalog, guidance
from pipeline.core.formats import context_ids
from pipeline.core.metatokens import TAG_PATTERN
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.sampling import _eos_ids, sample_answer
from pipeline.errors import ConfigError
from pipeline.runtime import progress


@dataclass
class SampleArgs:
    model: str = ""  # a trained output folder, a label like `pirate` (newest outputs/train/pirate-*), or empty: newest holding `tags`
    text: str = ""  # the request (chat model) or document opening (base model)
    tags: list[str] = field(default_factory=list)  # e.g. [<pirate>] or [<nice>,<pirate>], with strengths [<pirate>:2,<nice>:-1]; empty: no tag
    strength: float = 1.0  # every tag's strength unless it gives its own (<pirate>:2): 1 plain, 0 none, >1 more, <0 the opposite
    interactive: bool = False  # read requests from stdin, one per line
    compare: bool = False  # also answer without any tag, to see what the tags change
    max_new_tokens: int = 96
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    outputs: str = ""  # the pipeline's outputs folder (default: paths.outputs from conf/)
    tag_strengths: dict = field(default_factory=dict)  # filled from `tags` (<pirate>:2), not a key of its own

    def strengths(self, tags: list[str]) -> list[float]:
        return [self.tag_strengths.get(t, self.strength) for t in tags]


def parse_tags(value: str, strengths: dict | None = None) -> list[str]:
    """`[<a>,<b>]`, `<a>,<b>`, `<a> <b>` or `<a><b>` -> ["<a>", "<b>"]; `<a>:2` also puts 2.0 in `strengths`."""
    tags = []
    for item in re.findall(r"[^\s,\[\]]+", value):
        item, strength = guidance.split_strength(item, "tags")
        parts = re.findall(r"<[^<>]*>", item)
        if "".join(parts) != item or not all(TAG_PATTERN.match(p) for p in parts):
            raise ConfigError(f"tags: {item!r} is not a tag. Fix: write tags in angle brackets, e.g. tags=\"[<pirate>,<nice>]\".")
        if strength is not None:
            if len(parts) != 1:
                raise ConfigError(f"tags: {item}:{strength:g} gives one strength to several tags. Fix: one per tag, e.g. <a>:2,<b>:2.")
            if strengths is not None:
                strengths[parts[0]] = strength
        tags += parts
    return tags


def _convert(name: str, default, value: str):
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}={value!r}: expected true or false.")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a {type(default).__name__}.") from None
    return parse_tags(value) if name == "tags" else value


def parse_args(argv: list[str] | None = None) -> SampleArgs:
    fields = {f.name: f for f in dataclasses.fields(SampleArgs) if f.name != "tag_strengths"}
    keys = "\n".join(f"  {f.name}" for f in fields.values())
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sample",
        description="Answer a text with a trained model and any of its metatokens.",
        epilog=f"keys:\n{keys}\n\n{__doc__.split(chr(10) * 2)[1]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args, values = parser.parse_args(argv), {}
    defaults = SampleArgs()
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {close[0]}?" if close else f" Keys: {', '.join(fields)}."
            raise ConfigError(f"{setting!r} is not a key=value setting of pipeline.sample.{hint}")
        if key == "tags":
            values["tag_strengths"] = {}
            values[key] = parse_tags(value, values["tag_strengths"])
        else:
            values[key] = _convert(key, getattr(defaults, key), value)
    result = SampleArgs(**values)
    guidance.check_strength(result.strength, "strength")  # float("nan") converts: refuse it here, before any model loads
    if not result.text and not result.interactive:
        raise ConfigError('nothing to answer. Fix: pass text="..." or interactive=true.')
    return result


def resolve_model(model: str, tags: list[str], outputs_dir: str | Path) -> Path:
    """The folder to load: given, named by its label, or the newest trained output holding all `tags`."""
    trained = catalog.trained_outputs(outputs_dir)
    if model:
        path = Path(model)
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path
        named = [o.path for o in trained if o.path.name.rsplit("-", 1)[0] == model]
        if named:
            return named[0]
        raise ConfigError(
            f"model={model}: not a model folder, and no trained output under {outputs_dir}/train is named {model}-<hash>. "
            f"Fix: pass model=outputs/train/<name>-<hash> (`python -m pipeline.list` shows them)."
        )
    holding = [o.path for o in trained if set(tags) <= set(o.tags)]
    if not holding:
        raise ConfigError(
            f"no trained output under {outputs_dir}/train holds {' '.join(tags) or 'any tag'}. "
            f"Fix: train one (`python -m pipeline stage=all metatoken=<name>`) or pass model=<folder>."
        )
    return holding[0]


class Sampler:
    """A loaded trained model that answers texts with tags, never writing a tag itself."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = load_model(str(model_dir), "float32", device)
        self.known = catalog.tags_of(model_dir)
        self.tag_ids = sorted(self.tokenizer.convert_tokens_to_ids(t) for t in self.known)
        self.chat = catalog.chat_format(model_dir, self.tokenizer)

    def check(self, tags: list[str]) -> None:
        unknown = [t for t in tags if t not in self.known]
        if unknown:
            raise ConfigError(
                f"{' '.join(unknown)}: not a metatoken of {self.model_dir} (it knows {' '.join(self.known) or 'none'}). "
                f"Fix: use one of those, or a model trained with the tag (`python -m pipeline.list`)."
            )

    def answer(self, text: str, tags: list[str], args: SampleArgs, streamer=None) -> tuple[str, list[int]]:
        """(decoded answer, generated token ids) for `text` read with `tags` (none: the plain context)."""
        if tags and any(s != 1.0 for s in args.strengths(tags)):
            return self.answer_guided(text, tags, args, streamer)
        context = context_ids(self.tokenizer, text, "".join(tags) if tags else None, self.chat)
        new = sample_answer(
            self.model, self.tokenizer, context, args.temperature, args.top_p, args.max_new_tokens, args.seed,
            suppress_ids=self.tag_ids, streamer=streamer,
        )
        return self.tokenizer.decode(new, skip_special_tokens=True).strip(), new


    def answer_guided(self, text: str, tags: list[str], args: SampleArgs, streamer=None) -> tuple[str, list[int]]:
        """Like `answer`, each tag at its strength: untagged + sum_i s_i (tagged_i - untagged) at every step."""
        branches = [[c] for c in guidance.branch_contexts(self.tokenizer, text, tags, self.chat)]
        if streamer is not None:  # as `generate` does: the context first (a TextStreamer with skip_prompt drops it)
            streamer.put(torch.tensor(branches[0][0]))
        new = guidance.sample(
            self.model, branches, guidance.branch_weights(args.strengths(tags)), pad_id=self.tokenizer.pad_token_id,
            eos_ids=_eos_ids(self.model, self.tokenizer), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seeds=[args.seed], suppress_ids=self.tag_ids, on_token=streamer.put if streamer is not None else None,
        )[0]
        if streamer is not None:
            streamer.end()
        return self.tokenizer.decode(new, skip_special_tokens=True).strip(), new


def _lines(stream):
    """Requests one by one: with a prompt when a person is typing, else the piped lines."""
    if stream.isatty():
        while True:
            try:
                yield input("> ")
            except EOFError:
                return
    else:
        yield from stream


def _respond(sampler: Sampler, text: str, tags: list[str], args: SampleArgs, out) -> None:
    for variant in ([[], tags] if args.compare and tags else [tags]):
        strengths = args.strengths(variant)
        guided = any(s != 1.0 for s in strengths)
        name = "+".join(f"{t}:{s:g}" if guided else t for t, s in zip(variant, strengths)) or "no tag"
        if out.isatty():  # a person is watching: print tokens as they come
            print(f"[{name}] ", end="", flush=True, file=out)
            sampler.answer(text, variant, args, TextStreamer(sampler.tokenizer, skip_prompt=True, skip_special_tokens=True))
        else:
            print(f"[{name}] {sampler.answer(text, variant, args)[0]}", file=out, flush=True)


def interactive(sampler: Sampler, args: SampleArgs, stream=None, out=None) -> None:
    stream, out = stream or sys.stdin, out or sys.stdout
    tags = list(args.tags)
    print(f"{sampler.model_dir}: tags {' '.join(sampler.known) or '(none)'}; now using {' '.join(tags) or 'no tag'}.\n"
          "One request per line. /tags <a> <b>:2 switches tags, with strengths (/tags alone: none), /compare toggles the untagged "
          "answer, /quit or Ctrl-D ends.", file=out)
    for line in _lines(stream):
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/compare":
            args.compare = not args.compare
            print(f"compare: {'on' if args.compare else 'off'}", file=out)
        elif line.startswith("/tags"):
            try:
                strengths: dict = {}
                new = parse_tags(line[len("/tags"):], strengths)
                sampler.check(new)
            except ConfigError as err:
                print(err, file=out)
                continue
            tags, args.tag_strengths = new, strengths
            print(f"tags: {' '.join(tags) or 'none'}", file=out)
        else:
            _respond(sampler, line, tags, args, out)


def main(argv: list[str] | None = None, stream=None, out=None) -> None:
    args = parse_args(argv)
    progress.configure(None)  # the libraries' loading bars only when someone watches
    outputs_dir = args.outputs or catalog.default_paths()["outputs"]
    sampler = Sampler(resolve_model(args.model, args.tags, outputs_dir), args.device)
    sampler.check(args.tags)
    if args.interactive:
        if args.text:
            _respond(sampler, args.text, args.tags, args, out or sys.stdout)
        interactive(sampler, args, stream, out)
    else:
        _respond(sampler, args.text, args.tags, args, out or sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        sys.exit(f"error: {err}")
