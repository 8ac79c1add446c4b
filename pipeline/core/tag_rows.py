"""The tags' embedding rows as their own small parameter, while the embedding matrix stays frozen.

Training a tag means training its row of the input embedding. Trained in place, that row makes the whole
[vocab x d] matrix a parameter: every step computes its full gradient (SmolLM2 ties it to the LM head, so
the head's weight gradient too), masks all but the tag rows, and runs Adam over 28M numbers, about a quarter
of a LoRA step's time on 2 CPU cores (benchmarks/train_step.py: 3.13 against 2.28 s). The tags' *output* rows never get a
gradient anyway: their logits are suppressed everywhere (the student reads tags, never writes them). So
`attach` freezes the matrix and registers a [n_tags x d] parameter whose rows replace the tags' embeddings
on the way in, the same function with the same gradient; `merge` writes them back into the matrix (input
row and tied output row alike) before the model is saved, so the saved model is a plain HF model.
"""
from __future__ import annotations

import torch

ROWS = "tag_rows"  # the parameter's name on the embedding module (in parameter names and checkpoints)
IDS = "tag_row_ids"  # the buffer that says which token each row stands for


def attach(embedding: torch.nn.Embedding, tag_ids: list[int]) -> torch.nn.Parameter:
    """Freeze `embedding`'s matrix and give it a trainable row per tag (starting at the matrix's row)."""
    embedding.weight.requires_grad_(False)
    rows = torch.nn.Parameter(embedding.weight.detach()[list(tag_ids)].clone())
    embedding.register_parameter(ROWS, rows)
    embedding.register_buffer(IDS, torch.tensor(list(tag_ids), device=rows.device), persistent=False)
    embedding._tag_rows_hook = embedding.register_forward_hook(_replace_tag_rows)
    return rows


def _replace_tag_rows(module, args, out: torch.Tensor) -> torch.Tensor:
    ids = args[0]
    match = ids.unsqueeze(-1) == getattr(module, IDS)  # [..., n_tags]
    hit = match.any(-1, keepdim=True)
    # no shortcut when no tag is in the batch: the rows stay in every forward's graph (zero gradient), so DDP,
    # which marks parameters a forward did not use as ready, never sees them twice in the untagged term's step
    picked = getattr(module, ROWS)[match.int().argmax(-1)]  # an exact gather (no matmul: no rounding under autocast)
    return torch.where(hit, picked.to(out.dtype), out)


def attached(embedding: torch.nn.Module) -> bool:
    return hasattr(embedding, ROWS)


def merged_weight(embedding: torch.nn.Embedding) -> torch.Tensor:
    """The embedding matrix with the trained tag rows written in (a copy; for checkpoints)."""
    weight = embedding.weight.detach().clone()
    weight[getattr(embedding, IDS)] = getattr(embedding, ROWS).detach().to(weight.dtype)
    return weight


@torch.no_grad()
def load(embedding: torch.nn.Embedding, weight: torch.Tensor) -> None:
    """Restore the attached tag rows from a checkpoint's matrix (`merged_weight`)."""
    getattr(embedding, ROWS).copy_(weight[getattr(embedding, IDS).cpu()])


@torch.no_grad()
def merge(embedding: torch.nn.Embedding) -> None:
    """Write the trained rows into the matrix and remove the parameter and hook: a plain embedding again."""
    if not attached(embedding):
        return
    embedding.weight[getattr(embedding, IDS)] = getattr(embedding, ROWS).to(embedding.weight.dtype)
    embedding._tag_rows_hook.remove()
    del embedding._tag_rows_hook
    delattr(embedding, ROWS)
    delattr(embedding, IDS)
