"""Teacher-forced scoring: the one forward pass that gives the logits predicting each continuation token.

Training (a padded batch), evaluation (lists of contexts, batched here) and the pretrain mode (packed
blocks) all read logits through these functions; tags are suppressed, as when the saved model samples.
"""
from __future__ import annotations

import torch

from pipeline.core.data import gather_positions, pad_examples
from pipeline.core.losses import full_kl, suppress
from pipeline.runtime.progress import tqdm  # bars only when someone watches (progress=...)


def batch_logits(model, batch: dict, tag_ids: list[int], prefix: str = "") -> torch.Tensor:
    """Logits [B, T, V] that predict each continuation token of a padded batch (`pad_examples`), tags suppressed.

    `prefix` picks another context of the same batch (`plain_`: the untagged one).
    """
    logits = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits
    return suppress(gather_positions(logits, batch[prefix + "output_positions"]), list(tag_ids))


@torch.no_grad()
def continuation_logits(
    model, contexts, continuations, pad_id, batch_size: int, desc: str, tag_ids: list[int] = ()
) -> list[torch.Tensor]:
    """Logits [T_i, V] that predict each continuation token after its context, teacher-forced.

    Tags are suppressed, as the saved model's generation config does when it samples.
    """
    result = []
    for start in tqdm(range(0, len(contexts), batch_size), desc=desc, unit="batch", leave=False):
        batch = pad_examples(contexts[start : start + batch_size], continuations[start : start + batch_size], pad_id)
        batch = {name: value.to(model.device) for name, value in batch.items()}
        picked = batch_logits(model, batch, tag_ids).float().cpu()
        result.extend(picked[b, : int(batch["output_mask"][b].sum())] for b in range(picked.shape[0]))
    return result


def token_kls(p_logits: list[torch.Tensor], q_logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """KL(p || q) at every continuation position, one tensor per example."""
    return [full_kl(p, q) for p, q in zip(p_logits, q_logits)]


def mean_kl(p_logits: list[torch.Tensor], q_logits: list[torch.Tensor]) -> float:
    """Token-weighted mean of KL(p || q) over all continuation positions."""
    return torch.cat(token_kls(p_logits, q_logits)).mean().item()


def packed_logits(model, batch: dict) -> torch.Tensor:
    """Forward a packed batch: no attention mask and no cache, so position ids fence each document."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
