"""Upload a trained output (weights, tokenizer, model card) to the Hugging Face hub.

    python -m pipeline.push outputs/train/pirate-0965a9483c repo_id=me/smollm2-pirate dry_run=true   # list, send nothing
    python -m pipeline.push outputs/train/pirate-0965a9483c repo_id=me/smollm2-pirate private=true

The repo is created if it does not exist (`create_repo(exist_ok=True)`), then the folder goes up in one
commit (`HfApi.upload_folder`), with the login of `huggingface-cli login` or `HF_TOKEN`. Only a finished
train output is sent (one with its manifest): a `.partial` folder or a random directory is refused.
Hidden files are left out. Tests run only the dry run, which never touches the network.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.runtime import outputs

log = logging.getLogger(__name__)
IGNORE = [".*", "**/.*", "checkpoints/**"]  # hidden files (atomic-write leftovers) and any stray checkpoints


def files_to_send(folder: Path) -> list[tuple[str, int]]:
    """(path in the repo, bytes) for every file upload_folder would send, with the same ignore patterns."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [(p, (folder / p).stat().st_size) for p in filter_repo_objects(paths, ignore_patterns=IGNORE)]


def listing(files: list[tuple[str, int]]) -> str:
    width = max(len(p) for p, _ in files)
    rows = [f"  {p:<{width}}  {size:>14,d} bytes" for p, size in files]
    return "\n".join(rows + [f"  {len(files)} files, {sum(s for _, s in files):,d} bytes"])


def push(folder: str | Path, repo_id: str, dry_run: bool = False, private: bool = False) -> list[tuple[str, int]]:
    """Send `folder` to `repo_id` (or, dry, only say what would be sent); returns the files."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"push: repo_id={repo_id!r} is not a hub repo id ({err}). Fix: write it as user/name.") from None
    if "/" not in repo_id:
        raise ConfigError(f"push: repo_id={repo_id!r} has no owner. Fix: write it as user/name.")
    outputs.train_manifest(folder, by="push")
    files = files_to_send(folder)
    if not (folder / "README.md").is_file():
        log.warning("push: %s has no model card (README.md); run evaluate on it to write one", folder)
    print(f"{'would send' if dry_run else 'sending'} {folder} -> https://huggingface.co/{repo_id}\n{listing(files)}")
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", ignore_patterns=IGNORE,
        commit_message=f"metatokens: {folder.name}",
    )
    print(f"pushed: {info.commit_url}")
    return files


def _flag(name: str, value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"push: {name}={value!r}: expected true or false.")
    return value.lower() in ("true", "1", "yes")


def main(argv: list[str] | None = None) -> list[tuple[str, int]]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.push", description=__doc__.split("\n\n")[0],
                                     epilog="keys: repo_id=user/name (required), dry_run=false, private=false")
    parser.add_argument("folder", help="a finished train output, e.g. outputs/train/pirate-0965a9483c")
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    settings = dict(s.split("=", 1) if "=" in s else (s, "") for s in args.settings)
    unknown = set(settings) - {"repo_id", "dry_run", "private"}
    if unknown:
        raise ConfigError(f"push: unknown key(s) {sorted(unknown)}. Fix: use repo_id=, dry_run= and private=.")
    if not settings.get("repo_id"):
        raise ConfigError("push: repo_id is missing. Fix: add repo_id=user/name.")
    return push(args.folder, settings["repo_id"], _flag("dry_run", settings.get("dry_run", "false")),
                _flag("private", settings.get("private", "false")))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
