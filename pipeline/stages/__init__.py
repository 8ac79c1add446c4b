"""The pipeline's stages, one recipe each, in the order they run: synthesize -> generate -> extend -> train ->
evaluate. Each stage reads its upstream stages' folders and writes its own (see paths.py)."""
