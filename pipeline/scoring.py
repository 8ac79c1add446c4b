"""Two savings in training's teacher-forced passes, both exact.

- `scored_logits`: the LM head runs only at the positions a loss reads (the continuation), not at
  every context position. The head is a [hidden x vocab] matmul per position (576 x 49,152 on the
  default model, about a fifth of its forward FLOPs per position) and its backward is as large, so
  computing it for context positions whose logits are thrown away was pure cost. transformers 5's
  `logits_to_keep` takes per-row positions [B, T] and slices the hidden states before the head.
- `ReferenceMemo`: the untagged term's reference (the frozen starting model on the untagged
  input) never changes, so each example's reference logits are kept the first time they are
  computed and read back in later epochs, like the online teacher's (`CachedPromptTeacher`).
"""
from __future__ import annotations

import torch

from pipeline.data import gather_positions
from pipeline.losses import suppress


def scored_logits(model, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """Logits [B, T, V] at `positions` [B, T] of the batch `inputs` (model forward kwargs).

    Equal to `gather_positions(model(**inputs).logits, positions)`, without the head's work elsewhere.
    """
    logits = model(**inputs, logits_to_keep=positions).logits
    if logits.dim() == 3 and logits.shape[:2] == positions.shape:
        return logits
    if logits.dim() == 3 and logits.shape[1] == inputs["input_ids"].shape[1]:  # it ignored `logits_to_keep`
        return gather_positions(logits, positions)
    raise ValueError(
        f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for per-row positions "
        f"{tuple(positions.shape)}: it does not take transformers' 2D `logits_to_keep`."
    )


class ReferenceMemo:
    """The untagged term's reference logits (tags suppressed) per example, kept up to `memo_mb`.

    An example is keyed by its untagged token sequence and its continuation's length (which fix
    the scored positions). Exact: a kept row is the computed tensor. Only valid while the reference
    cannot change: it is frozen, and the tag rows that do train are suppressed in its logits.
    """

    def __init__(self, memo_mb: float):
        self.memo: dict[tuple, torch.Tensor] = {}
        self.memo_bytes, self.memo_limit = 0, memo_mb * 2**20
        self.computed = 0  # examples the reference actually ran on (the rest came from the memo)

    @staticmethod
    def keys(batch: dict) -> list[tuple]:
        lengths = batch["plain_attention_mask"].sum(1).tolist()
        outputs = batch["plain_output_mask"].sum(1).tolist()
        return [(tuple(ids[:n].tolist()), t) for ids, n, t in zip(batch["plain_input_ids"], lengths, outputs)]

    @torch.no_grad()
    def logits(self, compute, batch: dict, tag_ids: list[int]) -> torch.Tensor:
        """[B, T, V] reference logits for `batch`; `compute(sub_batch)` runs the reference on the rows not kept."""
        keys = self.keys(batch)
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        rows: dict[int, torch.Tensor] = {}
        if missing:
            index = torch.tensor(missing, device=batch["plain_input_ids"].device)
            sub = {name: value.index_select(0, index) for name, value in batch.items() if name.startswith("plain_")}
            fresh = compute(sub)
            self.computed += len(missing)
            for j, i in enumerate(missing):
                rows[i] = fresh[j, : keys[i][1]]
                if self.memo_bytes + rows[i].nbytes <= self.memo_limit:
                    self.memo[keys[i]] = rows[i].clone()  # a copy: a view would keep the whole batch alive
                    self.memo_bytes += rows[i].nbytes
        width = batch["plain_output_mask"].shape[1]
        out = [rows[i] if i in rows else self.memo[key] for i, key in enumerate(keys)]
        # Past each continuation's end the loss is masked; zeros (tags suppressed) keep it finite there.
        return suppress(torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - len(r))) for r in out]), tag_ids)
