"""Teacher-forced scoring: the one forward pass that gives the logits predicting each continuation token,
and the KL figures computed from them.

Training (a padded batch), evaluation (lists of contexts, batched here) and the pretrain mode (packed
blocks) all read logits through these functions; tags are suppressed, as when the saved model samples.
Two savings, both exact:

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

from pathlib import Path

import torch

from pipeline.core.data import gather_positions, pad_examples
from pipeline.core.job import Job
from pipeline.core.losses import bootstrap_interval, full_kl, pooled_mean, pooled_recovery, recovery, suppress
from pipeline.core.models import load_model, load_tokenizer
from pipeline.errors import ConfigError
from pipeline.runtime.progress import tqdm  # bars only when someone watches (progress=...)


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


def batch_logits(model, batch: dict, tag_ids: list[int], prefix: str = "") -> torch.Tensor:
    """Logits [B, T, V] that predict each continuation token of a padded batch (`pad_examples`), tags suppressed.

    `prefix` picks another context of the same batch (`plain_`: the untagged one).
    """
    logits = scored_logits(  # the LM head only at the continuation's positions
        model, batch[prefix + "output_positions"], input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]
    )
    return suppress(logits, list(tag_ids))


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


def kl_figures(effect_tokens, residual_tokens, eval_cfg, prefix: str = "") -> dict:
    """Residual and recovery (token-weighted over the inputs) with recovery's 95% bootstrap interval over inputs."""
    residual = torch.cat(residual_tokens).mean().item()
    effect = torch.cat(effect_tokens).mean().item()
    interval = bootstrap_interval(
        pooled_recovery, [t.sum().item() for t in residual_tokens], [t.sum().item() for t in effect_tokens],
        resamples=eval_cfg.resamples, seed=eval_cfg.seed,
    )
    return {prefix + "residual_kl": residual, prefix + "recovery": recovery(effect, residual), prefix + "recovery_ci": list(interval)}


def drift_figures(base_logits, model_logits, eval_cfg, prefix: str = "") -> dict:
    """Drift KL(base || model) per token on untagged inputs, with its 95% bootstrap interval over inputs."""
    per_token = token_kls(base_logits, model_logits)
    interval = bootstrap_interval(
        pooled_mean, [t.sum().item() for t in per_token], [len(t) for t in per_token], resamples=eval_cfg.resamples, seed=eval_cfg.seed
    )
    return {prefix + "drift_kl": torch.cat(per_token).mean().item(), prefix + "drift_kl_ci": list(interval)}


def load_scored_model(path: Path, job: Job, cfg):
    tok = load_tokenizer(str(path))
    missing = [t for t in job.tags if t not in tok.get_vocab()]
    if missing:
        raise ConfigError(f"{path}: its tokenizer lacks {missing}. Fix: re-run extend and train with this config.")
    return tok, load_model(str(path), cfg.model.dtype, cfg.model.device)
