"""Data components: reading and splitting input texts, and batching (context, continuation) pairs.

Every stage scores or trains on the same shape of example: a context (teacher, student or plain)
followed by a continuation the teacher wrote. `pad_examples` lays a batch of those out so that
position `output_positions[b, t]` holds the logits that predict continuation token t.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.core.conversations import check_messages, transcript
from pipeline.errors import ConfigError


def load_inputs(path: str | Path) -> list[dict]:
    """Read a JSONL file of {"id", "text"} rows (or {"id", "messages"}: a conversation, whose "text" becomes its
    transcript), failing on the first bad row with its line number and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"inputs.file: {path} does not exist. Fix: point inputs.file to a JSONL file of id/text rows.")
    rows, seen = [], {}  # id as a string -> (line, id as written)
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg}). Fix: one JSON object per line.") from None
        if isinstance(row, dict) and "messages" in row:  # a conversation (pipeline/conversations.py)
            if "text" in row:
                raise ConfigError(f"{where}: the row has both 'text' and 'messages'. Fix: give one of them.")
            row = {**row, "messages": check_messages(row["messages"], where)}
        for key in ("id",) if isinstance(row, dict) and "messages" in row else ("id", "text"):
            if not isinstance(row, dict) or not str(row.get(key, "")).strip():
                raise ConfigError(f"{where}: field '{key}' is missing or empty. Fix: every row needs a non-empty '{key}'.")
        # Ids are compared as the strings they become: 8 and "8" would both be "8" and one row would be lost.
        row_id = str(row["id"])
        if row_id in seen:
            first_line, first = seen[row_id]
            raise ConfigError(
                f"{where}: id {row['id']!r} ({type(row['id']).__name__}) is the same id as {first!r} "
                f"({type(first).__name__}) on line {first_line}: both are {row_id!r} as strings. Fix: ids must be unique."
            )
        seen[row_id] = (line_no, row["id"])
        if "messages" in row:
            rows.append({"id": row_id, "text": transcript(row["messages"]), "messages": row["messages"]})
            continue
        rows.append({"id": str(row["id"]), "text": str(row["text"]).strip()})
    if not rows:
        raise ConfigError(f"{path}: no rows. Fix: add JSONL rows with 'id' and 'text'.")
    return rows


def is_heldout(row_id: str, heldout_fraction: float) -> bool:
    """Stable split by a hash of the id: adding rows never moves an existing row across the split."""
    bucket = int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < heldout_fraction


def split_inputs(rows: list[dict], heldout_fraction: float, max_train=None, max_heldout=None):
    train = [r for r in rows if not is_heldout(r["id"], heldout_fraction)]
    heldout = [r for r in rows if is_heldout(r["id"], heldout_fraction)]
    return train[:max_train], heldout[:max_heldout]


def pad_examples(contexts: list[list[int]], continuations: list[list[int]], pad_id: int) -> dict:
    """Right-pad context+continuation pairs into one batch.

    Returns input_ids [B, L], attention_mask [B, L], output_positions [B, T] (the index whose logits
    predict each continuation token) and output_mask [B, T] (false on padding).
    """
    sequences = [c + o for c, o in zip(contexts, continuations)]
    length = max(len(s) for s in sequences)
    longest_out = max(len(o) for o in continuations)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    output_positions = torch.zeros((batch, longest_out), dtype=torch.long)
    output_mask = torch.zeros((batch, longest_out), dtype=torch.bool)
    for b, (ctx, out) in enumerate(zip(contexts, continuations)):
        seq = ctx + out
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        output_positions[b, : len(out)] = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(out))
        output_mask[b, : len(out)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "output_positions": output_positions,
        "output_mask": output_mask,
    }


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V], positions [B, T] -> [B, T, V]."""
    return logits[torch.arange(logits.shape[0], device=logits.device)[:, None], positions]


def pad_2d(rows: list[list[list]], width: int, fill, dtype) -> torch.Tensor:
    """Pad ragged [T_i, k] lists into a [B, T_max, k] tensor."""
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest, width), fill, dtype=dtype)
    for b, r in enumerate(rows):
        if r:
            out[b, : len(r)] = torch.tensor(r, dtype=dtype)
    return out
