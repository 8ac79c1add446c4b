"""A steering vector beside a trained tag: the prompt's mean effect on one layer's residual stream,
added back without the prompt (activation addition, Turner et al. 2023).

For a layer L (1 <= L < num_layers), h_L = hidden_states[L], the residual stream after L decoder
blocks (the output of `layers[L - 1]`; hidden_states[num_layers] is after the final norm, so it is
not a residual stream to add to). The vector is

    v_L = mean over positions of  h_L(prompt + input + answer) - h_L(input + answer)

over training inputs, teacher-forced on the teacher's recorded answers, so both contexts read the
same answer tokens and the difference is the prompt's alone. Positions (`positions`):
- "answer": every position that predicts an answer token (the last context position and every
  answer position but the last), the positions recovery is scored on;
- "last": the last context position only (the token before the answer: what the prompt has done
  to the model by the time it starts writing).
At inference `steering(model, v, L, scale)` adds scale * v to h_L at every position of every
forward (a hook on `layers[L - 1]`), so a plain, untagged context is read as if the prompt's mean
effect were there. The study that compares it with the tag is `benchmarks/steering.py`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipeline.core.data import gather_positions, pad_examples
from pipeline.core.scoring import continuation_logits, drift_figures, kl_figures, token_kls
from pipeline.errors import ConfigError

POSITIONS = ("answer", "last")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (Llama-style `model.model.layers`)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder `layers` to steer. Fix: use a Llama-style model.")
    return layers


def check_layer(model, layer: int) -> None:
    count = len(decoder_layers(model))
    if not 1 <= layer < count:
        raise ConfigError(
            f"steering layer {layer}: the model has {count} decoder layers, and hidden_states[L] is a residual stream "
            f"for 1 <= L < {count} (hidden_states[{count}] is after the final norm). Fix: pick a layer in 1..{count - 1}."
        )


def _layer_states(model, contexts, continuations, layers, pad_id) -> tuple[dict, torch.Tensor]:
    """h_L at the positions that predict each continuation token: ({L: [B, T, H]}, output mask [B, T])."""
    batch = pad_examples(contexts, continuations, pad_id)
    captured, handles = {}, []
    for layer in layers:  # the block's own output: exactly what `steering` adds to
        hook = lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[0] if isinstance(out, tuple) else out)  # noqa: E731  (one hook per layer, bound by default argument)
        handles.append(decoder_layers(model)[layer - 1].register_forward_hook(hook))
    try:
        device = model.device
        model.get_decoder()(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    positions = batch["output_positions"].to(device)
    return {layer: gather_positions(captured[layer], positions).float().cpu() for layer in layers}, batch["output_mask"]


@torch.no_grad()
def mean_differences(
    model, with_contexts, without_contexts, continuations, layers, pad_id: int, batch_size: int = 8, positions: str = "answer"
) -> dict:
    """Steering vectors: the mean of h_L(with) - h_L(without) over the chosen positions of all examples.

    Args:
        with_contexts / without_contexts: token ids of each example's context with and without the prompt.
        continuations: the answer token ids both contexts are teacher-forced on.
        layers: the layers L to compute (1 <= L < num_layers).
        positions: "answer" (every position predicting an answer token) or "last" (the last context position).
    Returns:
        {"vectors": {L: v_L [H]}, "norms": {L: mean |h_L| without the prompt at those positions},
         "positions": how many positions were averaged} (token-weighted: a long answer weighs more).
    """
    if positions not in POSITIONS:
        raise ConfigError(f"steering positions {positions!r}. Fix: use one of {', '.join(POSITIONS)}.")
    for layer in layers:
        check_layer(model, layer)
    sums, norms, count = {}, {}, 0
    for start in range(0, len(continuations), batch_size):
        outs = continuations[start : start + batch_size]
        with_h, mask = _layer_states(model, with_contexts[start : start + batch_size], outs, layers, pad_id)
        without_h, _ = _layer_states(model, without_contexts[start : start + batch_size], outs, layers, pad_id)
        if positions == "last":
            mask = mask & (torch.arange(mask.shape[1]) == 0)
        weight = mask.unsqueeze(-1).double()
        for layer in layers:
            diff = (with_h[layer].double() - without_h[layer].double()) * weight
            sums[layer] = sums.get(layer, 0) + diff.sum((0, 1))
            norms[layer] = norms.get(layer, 0) + (without_h[layer].double().norm(dim=-1) * mask).sum().item()
        count += int(mask.sum())
    return {
        "vectors": {layer: (sums[layer] / count).float() for layer in layers},
        "norms": {layer: norms[layer] / count for layer in layers},
        "positions": count,
    }


@contextlib.contextmanager
def steering(model, vector: torch.Tensor, layer: int, scale: float):
    """Inside the block, every forward adds scale * vector to h_L at every position (then the hook is removed)."""
    check_layer(model, layer)
    module = decoder_layers(model)[layer - 1]
    delta = (scale * vector.float()).to(device=model.device, dtype=model.dtype)

    def add(_module, _inputs, output):
        if isinstance(output, tuple):  # older transformers: (hidden_states, ...)
            return (output[0] + delta, *output[1:])
        return output + delta

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Heldout:
    """What every model is scored on: the held-out inputs' teacher answers (recovery) and base answers (drift).

    All logits are the base model's own, computed once: the teacher is the base model reading the prompt.
    """
    teacher_outputs: list  # the teacher's recorded answers (token ids), one per held-out input
    teacher_logits: list  # [T_i, V] the teacher on its own answers
    effect_tokens: list  # [T_i] KL(teacher || base without prompt) per answer token
    base_outputs: list  # the base model's recorded untagged answers (inputs that have one)
    base_logits: list  # [T_i, V] the base model on its own answers


def scores(model, contexts, drift_contexts, heldout: Heldout, pad_id: int, eval_cfg, batch_size: int, tag_ids=(), name: str = "") -> dict:
    """Recovery of the prompt's effect reading `contexts`, and KL(base || model) on the base answers reading `drift_contexts`.

    Both as the evaluate stage computes them (full vocabulary, teacher-forced, token-weighted, 95%
    bootstrap intervals over inputs). Call it inside `steering(...)` to score a steered model.
    """
    logits = continuation_logits(model, contexts, heldout.teacher_outputs, pad_id, batch_size, f"{name} teacher answers", tag_ids)
    figures = kl_figures(heldout.effect_tokens, token_kls(heldout.teacher_logits, logits), eval_cfg)
    drift_logits = continuation_logits(model, drift_contexts, heldout.base_outputs, pad_id, batch_size, f"{name} base answers", tag_ids)
    return {**figures, **drift_figures(heldout.base_logits, drift_logits, eval_cfg)}
