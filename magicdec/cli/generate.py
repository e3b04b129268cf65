"""`magicdec generate`: generate for a batch of prompts, plainly or speculatively.

    magicdec generate --prompt "It is a truth" --max-new-tokens 32
    magicdec generate --corpus austen --context 4096 --batch 8 --spec self --budget 512 --compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from magicdec.engine.llm import DRAFT_PLACEMENTS, LLM
from magicdec.engine.outputs import GenerationResult
from magicdec.engine.sampling import SamplingParams
from magicdec.parallel.tp import init_from_env
from magicdec.spec.config import DRAFTERS, KV_SOURCES, METHODS, POSITIONS, SpecConfig

SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'8G', '8GiB', '512m' or a plain number of bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in SIZE_UNITS:
        return int(float(t[:-1]) * SIZE_UNITS[t[-1]])
    return int(t)


def parse_gamma(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text for a batch of prompts",
                              description="Generate for a batch of prompts, plainly or with speculative decoding.")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face checkpoint directory or .gguf file (default: built-in SmolLM2-135M)")
    m.add_argument("--dtype", help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    m.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    m.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward (default 512)")
    m.add_argument("--memory-budget", type=parse_size, help="bytes weights + caches may use, e.g. 8GiB")
    i = p.add_argument_group("prompts (one sequence each)")
    i.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable)")
    i.add_argument("--prompt-file", action="append", default=[], type=Path, help="a file whose text is one prompt")
    i.add_argument("--chat", action="store_true", help="wrap each --prompt/--prompt-file in the chat template")
    i.add_argument("--corpus", help="cut prompts from a corpus: 'austen', 'pg19', or a .txt/.jsonl file or directory")
    i.add_argument("--context", type=int, help="with --corpus: tokens per prompt")
    i.add_argument("--batch", type=int, default=1, help="with --corpus: number of prompts (default 1)")
    i.add_argument("--corpus-seed", type=int, default=0, help="with --corpus: which passages (default 0)")
    i.add_argument("--region", default="any", help="with --corpus: any, head or tail half of each document")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--spec", choices=METHODS, default="none", help="none, self (sparse-KV self-draft) or draft")
    d.add_argument("--drafter", choices=DRAFTERS, default="streaming", help="draft cache kind (default streaming)")
    d.add_argument("--gamma", type=parse_gamma, default=3, help="draft tokens per round, or 'auto'")
    d.add_argument("--budget", type=int, default=512, help="draft KV budget in tokens (default 512)")
    d.add_argument("--sinks", type=int, default=16, help="streaming: attention-sink tokens (default 16)")
    d.add_argument("--window", type=int, default=64, help="snapkv: sliding window inside the budget (default 64)")
    d.add_argument("--draft-model", help="with --spec draft: a smaller model sharing the tokenizer")
    d.add_argument("--draft-kv", choices=KV_SOURCES, default="target",
                   help="self: build the draft cache from the target's KV, or let the draft compute its own")
    d.add_argument("--positions", choices=POSITIONS, default="original", help="RoPE positions of kept tokens")
    d.add_argument("--draft-tp", choices=DRAFT_PLACEMENTS, default="auto",
                   help="under torchrun: shard the draft model like the target, or replicate it on every rank")
    d.add_argument("--compare", action="store_true", help="also run plain decoding and report the speedup")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def prompts_from_args(args: argparse.Namespace, llm: LLM) -> list[str | list[int]]:
    texts = list(args.prompt) + [f.read_text() for f in args.prompt_file]
    if args.chat:
        texts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    prompts: list[str | list[int]] = list(texts)
    if args.corpus:
        if not args.context:
            raise ValueError("--corpus needs --context L (tokens per prompt)")
        from magicdec.data import load_corpus, make_prompts

        region = args.region
        prompts += make_prompts(llm.tokenizer, load_corpus(args.corpus), args.batch, args.context,
                                seed=args.corpus_seed, region=region)
    if not prompts:
        raise ValueError("no prompts: give --prompt, --prompt-file or --corpus with --context")
    return prompts


def run(args: argparse.Namespace) -> int:
    device_type = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    tp = init_from_env(device_type)  # under torchrun: this process's rank
    llm = LLM(args.model, dtype=args.dtype, device=args.device if tp is None else device_type,
              prefill_chunk=args.prefill_chunk, memory_budget=args.memory_budget, tp=tp, draft_tp=args.draft_tp)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    spec = SpecConfig(method=args.spec, drafter=args.drafter, gamma=args.gamma, budget=args.budget, sinks=args.sinks,
                      window=args.window, draft_model=args.draft_model, kv_source=args.draft_kv,
                      positions=args.positions)
    if args.compare and not spec.enabled:
        raise ValueError("--compare compares speculative with plain decoding: add --spec self or --spec draft")
    leader = tp is None or tp.rank == 0  # only rank 0 prints
    result = llm.generate(prompts_from_args(args, llm), params, spec, compare=args.compare,
                          progress=leader and not (args.quiet or args.json))
    if not leader:
        return 0
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_summary(result, llm)
    return 0


def print_summary(result: GenerationResult, llm: LLM, out: Any = sys.stdout) -> None:
    for o in result.outputs:
        head = llm.tokenizer.decode(o.prompt_token_ids[-24:]).replace("\n", " ")
        print(f"--- sequence {o.index}: {len(o.prompt_token_ids)} prompt tokens, {len(o.token_ids)} generated "
              f"({o.finish_reason})", file=out)
        print(f"    …{head}", file=out)
        print(f">>> {o.text}", file=out)
    s = result.stats
    print(f"\nbatch {s.batch}, {s.prompt_tokens} prompt tokens: prefill {s.prefill_s:.2f} s; "
          f"decode {s.generated_tokens} tokens in {s.decode_s:.2f} s = {s.tokens_per_s:.1f} tokens/s", file=out)
    if s.method != "none":
        print(f"speculation ({s.method}): acceptance {s.acceptance_rate:.1%} of {s.draft_tokens} drafted tokens, "
              f"{s.mean_accepted_tokens:.2f} tokens per verification; draft {s.draft_s:.2f} s, "
              f"verify {s.verify_s:.2f} s", file=out)
    if result.baseline is not None:
        b = result.baseline
        same = s.extra.get("matches_plain")
        print(f"plain decoding of the same batch: {b.tokens_per_s:.1f} tokens/s -> speedup {result.speedup:.2f}x"
              + ("" if same is None else f"; outputs identical: {'yes' if same else 'NO'}"), file=out)
