"""Gather every finished evaluation into one report (a row per tag or tag set), or re-render one report in place.

    python -m pipeline.report                                     # all of outputs/evaluate -> outputs/report/
    python -m pipeline.report outputs/evaluate/pirate-1a2b3c4d5e  # re-render that folder's report in place

The rendering (report.md, a self-contained report.html, PNG plots) is pipeline/core/report.py's, the same
that evaluate writes into its own folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import PROJECT_ROOT
from pipeline.core.report import render
from pipeline.runtime.outputs import MANIFEST


def finished_evaluations(outputs_dir: str | Path) -> list[Path]:
    """Every complete evaluate folder, oldest first."""
    found = [d for d in (Path(outputs_dir) / "evaluate").glob("*") if (d / MANIFEST).is_file() and (d / "report.json").is_file()]
    return sorted(found, key=lambda d: (d / MANIFEST).stat().st_mtime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help="evaluate output folders (default: every finished one)")
    parser.add_argument("--outputs", default=str(PROJECT_ROOT / "outputs"), help="the pipeline's outputs folder")
    parser.add_argument("--out", help="where to write (default: the folder itself for one, else <outputs>/report)")
    args = parser.parse_args(argv)
    folders = args.folders or finished_evaluations(args.outputs)
    if not folders:
        parser.error(f"no finished evaluations under {args.outputs}/evaluate. Fix: run `python -m pipeline stage=all` first.")
    out = args.out or (folders[0] if len(folders) == 1 else Path(args.outputs) / "report")
    written = render(folders, out)
    print(f"report: {len(folders)} evaluation(s) -> {written['report.html']} (and report.md, {len(written) - 2} plot(s))")


if __name__ == "__main__":
    main()
