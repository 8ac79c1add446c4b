"""Metatoken pipeline: teach a language model special tokens that each stand for a long prompt.

Stages (one module each): generate -> extend -> train -> evaluate. Run them with
`python -m pipeline stage=all metatoken=nice` (see README.md).
"""
