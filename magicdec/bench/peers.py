"""Hugging Face transformers as a peer, measured on the same token inputs as our engine.

This file owns `HFPeers`: the same weights loaded into transformers (a GGUF through its own GGUF loader,
a checkpoint directory through `from_pretrained`), and three ways to decode with `generate`, all greedy
and ignoring EOS like the bench's own runs:

- ``hf-plain``: batched plain decoding (left padding with an attention mask when prompts differ in length);
- ``hf-prompt-lookup`` (batch 1): prompt lookup decoding, ``prompt_lookup_num_tokens``;
- ``hf-assisted`` (batch 1, with a draft model): assisted generation with transformers' default schedule.

Timing excludes prefill with a streamer: `generate` hands the prompt, then each newly committed group of
tokens, to ``streamer.put``. Decode time runs from the first put after the prompt (prefill and the first
token, or the first assisted round, which fuses them) to ``streamer.end()``, and covers the tokens
committed after that first put — the same N-1 tokens per sequence our engine's decode time covers.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

PROMPT_LOOKUP_TOKENS = 10


class _Clock:
    """A transformers streamer that timestamps every put (duck-typed BaseStreamer: put and end)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []  # (time, tokens per sequence in this put)
        self.end_time = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.marks.append((time.perf_counter(), 1 if value.dim() == 1 else value.shape[-1]))

    def end(self) -> None:
        self.end_time = time.perf_counter()


def load_hf(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> Any:
    """The transformers model for `path` (a .gguf file or a checkpoint directory), in eval mode, with EOS
    disabled in its generation config (a GenerationConfig passed to generate cannot unset it)."""
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    p = Path(path)
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    return model


class HFPeers:
    """Callable as the runner's `peers`: (prompts, max_new_tokens) → peer records."""

    def __init__(self, model_path: str | Path, dtype: torch.dtype, device: torch.device | str,
                 draft_model: str | Path | None = None, repeats: int = 1, pad_token_id: int = 0) -> None:
        self.device, self.repeats, self.pad = torch.device(device), repeats, pad_token_id
        t0 = time.perf_counter()
        self.model = load_hf(model_path, dtype, device)
        self.draft = load_hf(draft_model, dtype, device) if draft_model else None
        self.load_s = time.perf_counter() - t0
        import transformers

        self.version = transformers.__version__

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **kwargs: Any) -> dict[str, Any]:
        """One timed `generate`: its new tokens per sequence and its prefill and decode timings."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad,
                                      streamer=clock, **kwargs)
        first_time, first_tokens = clock.marks[1]
        decode_tokens = (out.shape[1] - width - first_tokens) * len(prompts)
        decode_s = clock.end_time - first_time
        return {"token_ids": out[:, width:].tolist(), "prefill_s": first_time - t0, "decode_s": decode_s,
                "decode_tokens": decode_tokens}

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> list[dict[str, Any]]:
        kinds: list[tuple[str, dict[str, Any] | None, str | None]] = [("hf-plain", {}, None)]
        if len(prompts) == 1:
            kinds.append(("hf-prompt-lookup", {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}, None))
            if self.draft is not None:
                kinds.append(("hf-assisted", {"assistant_model": self.draft}, None))
            else:
                kinds.append(("hf-assisted", None, "skipped: no --draft-model"))
        records = []
        for name, kwargs, note in kinds:
            rec: dict[str, Any] = {"config": name, "drafter": name, "budget": None, "gamma": None,
                                   "repeats": self.repeats, "transformers": self.version}
            if kwargs is None:
                records.append(rec | {"note": note})
                continue
            try:
                runs = [self.generate(prompts, max_new_tokens, **kwargs) for _ in range(self.repeats)]
            except Exception as exc:  # a peer that does not run here is reported, not fatal
                records.append(rec | {"note": f"failed: {type(exc).__name__}: {exc}"[:300]})
                continue
            rows = len(prompts)
            decode = [r["decode_s"] for r in runs]
            per_token = statistics.median(r["decode_s"] / r["decode_tokens"] for r in runs)  # assisted: varies
            rec.update(prefill_s=statistics.median(r["prefill_s"] for r in runs),
                       decode_tokens=runs[0]["decode_tokens"], decode_s=statistics.median(decode),
                       decode_s_all=decode, tokens_per_s=1 / per_token, latency_s=per_token * rows,
                       token_ids=runs[0]["token_ids"])
            records.append(rec)
        return records

    def steps(self, batch: int) -> int:
        """Progress units one call takes at this batch size."""
        return self.repeats * (1 + (batch == 1) * (1 + (self.draft is not None)))
