"""Per-batch decoding state and the stop rules.

`BatchState` holds, for each row of the batch: the sequence's token history (prompt, committed
tokens, and the pending token at index `lengths[b]`, which the target has not yet seen) and its
output record. A row whose sequence finished stops taking part at once: its forward positions
become -1 (padding: it writes to the caches' trash slots and reads one slot, so attention skips
it). Finished rows are then dropped from the state and every cache (`compaction_plan`): at once
when running eagerly, and under CUDA graphs when the batch can drop to a smaller captured size
(a padding row costs a graph almost nothing, a changed size costs a new graph). Compaction moves
as few rows as possible: rows already in place stay, and the holes take rows from the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magicdec.engine.outputs import RequestOutput
from magicdec.loading.tokenizer import Tokenizer
from magicdec.runtime.sampling import SamplingParams

STOP_TAIL_TOKENS = 16  # tokens decoded beyond a stop string's length in UTF-8 bytes when looking for it


class NumericalError(ValueError):
    """The model's logits hold NaN: greedy decoding would emit token 0 forever."""


def check_finite(bad: list[int], where: str) -> None:
    """Raise NumericalError if any row's flag in `bad` (read back with the round's tokens) is set."""
    if any(bad):
        raise NumericalError(f"the model produced NaN logits {where} (rows {[i for i, b in enumerate(bad) if b]}): "
                             "the weights hold NaN or the dtype overflows; try --dtype float32 or check the checkpoint")


class Stopper:
    """Applies EOS, stop strings and max_new_tokens to tokens as they are committed (the static batch's rows;
    a serving request has its own incremental `TextStream`)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_ids: set[int]) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.eos = set() if params.ignore_eos else set(eos_ids)
        # every token decodes to at least one byte: a tail of a stop string's UTF-8 length in tokens holds it
        # (a length in characters would miss characters of several tokens each, e.g. emoji)
        self.tail = max((len(s.encode()) for s in params.stop), default=0) + STOP_TAIL_TOKENS

    def extend(self, out: RequestOutput, new: list[int]) -> bool:
        """Append `new` to `out` up to the first stop condition; True if the sequence finished."""
        for token in new:
            out.token_ids.append(token)
            if token in self.eos:
                out.finish_reason = "stop"
            elif self.params.stop and self._stop_string(out):
                out.finish_reason = "stop"
            elif len(out.token_ids) >= self.params.max_new_tokens:
                out.finish_reason = "length"
            if out.finish_reason:
                return True
        return False

    def _stop_string(self, out: RequestOutput) -> bool:
        tail = self.tokenizer.decode(out.token_ids[-self.tail :])
        return any(s in tail for s in self.params.stop)

    def finalize(self, out: RequestOutput) -> None:
        text = self.tokenizer.decode(out.token_ids)
        if self.params.stop and out.finish_reason == "stop":
            cut = [text.find(s) for s in self.params.stop if s in text]
            if cut:
                text = text[: min(cut)]
        out.text = text


@dataclass(frozen=True, slots=True)
class BatchView:
    """What a γ policy sees of a batch: each live sequence's context and the tokens it may still generate."""

    contexts: list[int]
    remaining: list[int]


class BatchState:
    def __init__(self, outputs: list[RequestOutput], tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        self.outputs = outputs
        self.tokens = tokens  # [B, capacity + 2]; the last column is a trash column for padded writes
        self.lengths = lengths  # [B]: tokens already in the target's cache = position of the pending token
        self.active = torch.ones(len(outputs), dtype=torch.bool, device=tokens.device)
        self._all_active = True
        self.refresh_active()

    @property
    def rows(self) -> int:
        return len(self.outputs)

    @property
    def trash_column(self) -> int:
        return self.tokens.shape[1] - 1

    def live(self) -> list[int]:
        """Rows still generating: the one place the finished-row rule is read."""
        return [i for i, o in enumerate(self.outputs) if not o.finished]

    def view(self, max_new_tokens: int) -> BatchView:
        """The live rows' contexts and tokens still to generate (host-side, no device read)."""
        live = [self.outputs[i] for i in self.live()]
        return BatchView([o.context for o in live], [max_new_tokens - len(o.token_ids) for o in live])

    def pending(self) -> torch.Tensor:
        return self.tokens.gather(1, self.lengths[:, None])

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Forward positions for all rows, -1 (padding) for finished ones."""
        return pos if self._all_active else torch.where(self.active[:, None], pos, -1)

    def refresh_active(self) -> None:
        """Take finished sequences out of the forwards (after the stop rules ran)."""
        live = [not o.finished for o in self.outputs]
        if not all(live) or not self._all_active:
            self._all_active = all(live)
            self.active = torch.tensor(live, dtype=torch.bool, device=self.tokens.device)

    def commit(self, new: torch.Tensor, count: torch.Tensor) -> None:
        """Append new[b, :count[b]] after each live row's pending token, which becomes committed; the
        last appended token is the new pending one. Finished rows do not move."""
        if not self._all_active:
            count = torch.where(self.active, count, 0)
        offs = torch.arange(new.shape[1], device=new.device)
        cols = self.lengths[:, None] + 1 + offs
        cols = torch.where(offs < count[:, None], cols, self.trash_column)
        self.tokens.scatter_(1, cols, new)
        self.lengths = self.lengths + count

    def compaction_plan(self, eager: bool) -> list[int] | None:
        """Rows to keep (new row i ← old row plan[i]), or None to leave the batch as it is."""
        live = self.live()
        n, rows = len(live), self.rows
        if n == rows or (not eager and n > 0 and n > _bucket(rows) // 2):
            return None
        is_live = set(live)
        movers = iter(i for i in live if i >= n)
        return [i if i in is_live else next(movers) for i in range(n)]

    def compact(self, keep: list[int]) -> None:
        self.outputs = [self.outputs[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        self.tokens = self.tokens.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.refresh_active()

    def clone(self) -> BatchState:
        outs = [RequestOutput(o.index, o.prompt_token_ids, list(o.token_ids), o.text, o.finish_reason)
                for o in self.outputs]
        return BatchState(outs, self.tokens.clone(), self.lengths.clone())


def _bucket(rows: int) -> int:
    """The batch size a CUDA graph of `rows` rows is captured for (the next power of two)."""
    return 1 << (rows - 1).bit_length()
