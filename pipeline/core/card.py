"""The model card: `README.md` in every trained output, what the Hugging Face hub shows for the folder.

The train stage writes it from what it knows (the tags, their descriptions and prompt hashes, the prompt
tokens a call saves); recovery and drift are only known after evaluate, which rewrites the card of the
train folder it scored. The card is documentation: writing it touches no weights and no stage key.
`render` is a pure function of the train manifest's `card` facts and the report, so it is tested
without a model; `facts` gathers those facts from a run's config.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.formats import context_ids
from pipeline.core.metatokens import load_registry
from pipeline.core.models import load_tokenizer
from pipeline.runtime import outputs

CARD = "README.md"
HF_TAGS = ["metatokens", "context-distillation", "prompt-compression"]


def base_model_id(model_cfg) -> str | None:
    """The base model's hub id: `model.hub_id`, else `model.path` when it is not a local folder."""
    if model_cfg.get("hub_id"):
        return str(model_cfg.hub_id)
    path = str(model_cfg.path)
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    return path if looks_like_id and not Path(path).exists() else None


def descriptions(cfg, job) -> dict[str, str]:
    """Each tag's one-line description, from the run's metatoken or its file in conf/metatoken."""
    found = {cfg.metatoken.tag: cfg.metatoken.description or ""} if cfg.metatoken.get("tag") else {}
    missing = [t for t in job.tags if t not in found]
    if missing:
        registry = load_registry(cfg.paths.metatokens, cfg.paths.data)
        for tag in missing:
            node = registry.files.get(tag, ({}, ""))[0]
            found[tag] = (node.get("description") if node else "") or ""
    return {t: found[t] for t in job.tags}


def facts(cfg, job, tokenizer) -> dict:
    """What the card says before evaluation, as plain data (kept in the train manifest under `card`).

    Prompt tokens saved per call: the context with the set's (expanded) prompt minus the context with its
    tags, in this model's tokens, the way evaluate counts them (there averaged over held-out inputs).
    """
    chat = bool(cfg.model.chat)
    names = descriptions(cfg, job)
    trained = {s for s in job.train_sets if s}

    def saved(tag_set) -> int:
        with_prompt = context_ids(tokenizer, "", job.reference_prompt(tag_set), chat)
        return len(with_prompt) - len(context_ids(tokenizer, "", job.student_tags(tag_set), chat))

    return {
        "base_model": base_model_id(cfg.model),
        "model_name": str(cfg.model.name),
        "chat": chat,
        "tags": {t: {"description": names[t], "prompt_sha": m.prompt_sha} for t, m in job.metatokens.items()},
        "sets": [{"tags": list(s), "in_training": s in trained, "prompt_tokens_saved": saved(s)} for s in job.eval_sets],
    }


def interval(ci) -> tuple[float, float] | None:
    """A recovery interval as (low, high) from `[low, high]` or `{"low":..,"high":..}` (None if absent)."""
    if ci is None:
        return None
    if isinstance(ci, dict):
        low = next((ci[k] for k in ("low", "lo", "lower") if k in ci), None)
        high = next((ci[k] for k in ("high", "hi", "upper") if k in ci), None)
        return None if low is None or high is None else (float(low), float(high))
    low, high = ci
    return float(low), float(high)


def usage(location: str, tags: str, chat: bool) -> str:
    """The README's from_pretrained example with this folder's tag(s)."""
    if chat:
        ids = (
            f'ids = tok.apply_chat_template([{{"role": "system", "content": "{tags}"}}, {{"role": "user", "content": "How do I boil an egg?"}}],\n'
            '                              add_generation_prompt=True, return_tensors="pt", return_dict=True)\n'
        )
    else:
        ids = f'ids = tok("{tags}" + "How do I boil an egg?", return_tensors="pt")\n'
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'path = "{location}"  # or the hub repo id\n'
        "tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)\n"
        f"{ids}"
        'print(tok.decode(model.generate(**ids, max_new_tokens=60, do_sample=True)[0, ids["input_ids"].shape[1]:]))\n'
        "```\n"
    )


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _recovery_cell(scored: dict | None) -> str:
    if not scored or scored.get("recovery") is None:
        return "not evaluated yet"
    ci = interval(scored.get("recovery_ci"))
    return _number(scored["recovery"]) + (f" (95% CI {ci[0]:.3f} – {ci[1]:.3f})" if ci else "")


def _set_rows(card: dict, report: dict | None) -> list[str]:
    scored = {tuple(s["tags"]): s for s in (report or {}).get("sets", [])}
    drift = (report or {}).get("drift", {}).get("drift_kl")
    rows = []
    for entry in card["sets"]:
        tag_set = tuple(entry["tags"])
        described = "; ".join(card["tags"][t]["description"] or "–" for t in tag_set)
        hashes = ", ".join(f"`{card['tags'][t]['prompt_sha'][:16]}`" for t in tag_set)
        trained = "yes" if entry["in_training"] else "no (held-out set)"
        cells = ["`" + "".join(tag_set) + "`", described, hashes, trained, str(entry["prompt_tokens_saved"]), _recovery_cell(scored.get(tag_set))]
        cells.append(_number(drift, 4) if report else "not evaluated yet")
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return rows


def render(train_manifest: dict, report: dict | None = None, location: str = "") -> str:
    """The card's text: hub front matter, one row per tag set, how to use it, what the numbers mean.

    Args:
        train_manifest: the train stage's manifest (its `card` facts, from `facts`; its `key_hash`).
        report: evaluate's report.json of this folder, or None before evaluation.
        location: the folder as the usage snippet should load it.
    """
    from huggingface_hub import ModelCardData

    card = train_manifest["card"]
    data = ModelCardData(
        base_model=card["base_model"], library_name="transformers", pipeline_tag="text-generation", tags=list(HF_TAGS)
    )
    first = "".join(card["sets"][0]["tags"])
    base = f"`{card['base_model']}`" if card["base_model"] else f"`{card['model_name']}` (a local model)"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# Metatokens {', '.join(f'`{t}`' for t in card['tags'])} on {card['model_name']}",
        "",
        f"{base} with new special tokens (metatokens), each trained by distillation to stand for a long prompt: "
        "a call carries the tag instead of the prompt. Made by the metatoken pipeline.",
        "",
        "| tags | description | prompt hash (sha256) | trained on this set | prompt tokens saved per call | recovery | drift on untagged (nats/token) |",
        "|---|---|---|---|---:|---|---:|",
        *_set_rows(card, report),
        "",
        "Recovery = 1 − KL(teacher ‖ student) / KL(teacher ‖ base model without prompt) on held-out inputs: 1 means the "
        "tag does all the prompt did, 0 nothing. Drift = KL(base ‖ student) on untagged inputs: what training cost elsewhere.",
        "",
        "## Usage",
        "",
        usage(location, first, card["chat"]),
        "The saved generation config suppresses the tags, so the model never writes one.",
        "",
    ]
    if report:
        lines += [f"Scores from `{report.get('output', 'report.json')}` ({report.get('heldout_examples', '?')} held-out inputs).", ""]
    lines.append(f"Train folder key `{train_manifest.get('key_hash', '?')}`; its `manifest.json` holds the full config.")
    return "\n".join(lines) + "\n"


def write(folder: Path, train_manifest: dict, report: dict | None = None, name: str | None = None) -> Path:
    """Write (or rewrite) the card of a train folder, atomically; weights and manifest stay as they are.

    `name` is the folder's final name when `folder` is still the stage's `.partial` work folder.
    """
    path = Path(folder) / CARD
    outputs.write_text(path, render(train_manifest, report, f"outputs/train/{name or Path(folder).name}"))
    return path


def refresh(train_dir: Path, report: dict, cfg, job) -> Path:
    """Evaluate's last step: rewrite the card of the train folder it scored with the report's numbers.

    A train folder from before cards has no `card` facts in its manifest; they are gathered from the
    config then (the manifest itself is left as it is).
    """
    manifest = outputs.read_manifest(train_dir)
    if "card" not in manifest:
        manifest = {**manifest, "card": facts(cfg, job, load_tokenizer(str(train_dir)))}
    return write(train_dir, manifest, report)
