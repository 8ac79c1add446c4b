"""Command-line tools around the pipeline: sample, list (ls), report, push, port."""
