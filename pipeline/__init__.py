"""Metatoken pipeline: teach a language model special tokens that each stand for a long prompt.

Stages (pipeline/stages/, one recipe each): synthesize -> generate -> extend -> train -> evaluate, on components
in pipeline/core/ and infrastructure in pipeline/runtime/; commands in pipeline/cli/. Run them with
`python -m pipeline stage=all metatoken=nice` (see README.md).
"""
