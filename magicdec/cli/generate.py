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

from magicdec.bench.compare import Comparison, compare
from magicdec.bench.corpora.corpus import Corpus
from magicdec.cli.args import add_spec_flags, fit_budget, parse_count, parse_size, spec_from_args
from magicdec.costmodel.placement import DRAFT_PLACEMENTS
from magicdec.engine.outputs import GenerationResult
from magicdec.llm import LLM
from magicdec.loading import resolve_device
from magicdec.parallel.tp import init_from_env
from magicdec.runtime.sampling import SamplingParams


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text for a batch of prompts",
                              description="Generate for a batch of prompts, plainly or with speculative decoding.")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face checkpoint directory or .gguf file (default: built-in SmolLM2-135M)")
    m.add_argument("--dtype", help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    m.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    m.add_argument("--prefill-chunk", type=parse_count, default=512, help="prompt tokens per prefill forward")
    m.add_argument("--memory-budget", type=parse_size, help="bytes weights + caches may use, e.g. 8GiB")
    m.add_argument("--draft-tp", choices=DRAFT_PLACEMENTS, default="auto",
                   help="under torchrun: shard the draft model like the target, or replicate it on every rank")
    i = p.add_argument_group("prompts (one sequence each)")
    i.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable)")
    i.add_argument("--prompt-file", action="append", default=[], type=Path, help="a file whose text is one prompt")
    i.add_argument("--chat", action="store_true", help="wrap each --prompt/--prompt-file in the chat template")
    i.add_argument("--corpus", help="cut prompts from a corpus: 'austen', 'pg19', or a .txt/.jsonl file or directory")
    i.add_argument("--context", type=parse_count, help="with --corpus: tokens per prompt")
    i.add_argument("--batch", type=parse_count, help="with --corpus: number of prompts (default 1)")
    i.add_argument("--corpus-seed", type=int, help="with --corpus: which passages (default 0)")
    i.add_argument("--region", help="with --corpus: any (the default), head or tail half of each document")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=parse_count, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    add_spec_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--compare", action="store_true", help="also decode plainly and report the speedup (like for "
                   "like: alternating runs from the same warm prefix cache)")
    o.add_argument("--repeats", type=parse_count, default=2, help="with --compare: runs of each side (default 2)")
    o.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_prompt_files(paths: list[Path]) -> list[str]:
    texts = []
    for f in paths:
        try:
            texts.append(f.read_text(encoding="utf-8"))  # files, and pipes such as /dev/stdin or <(cmd)
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(f"--prompt-file {f}: {'is a directory' if f.is_dir() else 'no such file'}; "
                             "give a text file whose contents are one prompt") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {f} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    return texts


def prompts_from_args(args: argparse.Namespace, llm: LLM, texts: list[str],
                      corpus: Corpus | None) -> list[str | list[int]]:
    texts = list(args.prompt) + texts
    prompts: list[str | list[int]] = list(texts)
    if args.chat:  # the template renders the special tokens itself: encoded without adding a BOS
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    if corpus is not None:
        from magicdec.bench.corpora import make_prompts

        prompts += make_prompts(llm.tokenizer, corpus, args.batch, args.context, seed=args.corpus_seed,
                                region=args.region)
    return prompts


def run(args: argparse.Namespace) -> int:
    # every argument is checked before the model loads, so that a typo costs no wait
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    spec = spec_from_args(args)
    if args.compare and not spec.enabled:
        raise ValueError("--compare compares speculative with plain decoding: add --spec self or --spec draft")
    if args.corpus and not args.context:
        raise ValueError("--corpus needs --context L (tokens per prompt)")
    corpus_flags = ("context", "batch", "corpus_seed", "region")
    idle = [f for f in corpus_flags if not args.corpus and getattr(args, f) is not None]
    if idle:
        flags = ", ".join("--" + f.replace("_", "-") for f in idle)
        raise ValueError(f"{flags} cut{'s' if len(idle) == 1 else ''} prompts from a corpus: add --corpus (e.g. "
                         f"--corpus austen) or drop {flags} (each --prompt is one sequence)")
    args.batch, args.corpus_seed, args.region = args.batch or 1, args.corpus_seed or 0, args.region or "any"
    if not (args.prompt or args.prompt_file or args.corpus):
        raise ValueError("no prompts: give --prompt, --prompt-file or --corpus with --context")
    texts = read_prompt_files(args.prompt_file)
    corpus = None
    if args.corpus:
        from magicdec.bench.corpora import load_corpus
        from magicdec.bench.corpora.corpus import region_bounds

        region_bounds(args.region)
        corpus = load_corpus(args.corpus)
    device_type = resolve_device(args.device).type
    tp = init_from_env(device_type)  # under torchrun: this process's rank
    llm = LLM(args.model, dtype=args.dtype, device=args.device if tp is None else device_type,
              prefill_chunk=args.prefill_chunk, memory_budget=args.memory_budget, tp=tp, draft_tp=args.draft_tp)
    leader = tp is None or tp.rank == 0  # only rank 0 prints
    progress = leader and not (args.quiet or args.json)
    prompts = prompts_from_args(args, llm, texts, corpus)
    spec = fit_budget(spec, max(map(len, llm.encode(prompts))) + params.max_new_tokens, "generate")
    if args.compare:
        comparison = compare(llm, prompts, params, spec, repeats=args.repeats, progress=progress)
        result: GenerationResult | Comparison = comparison
        outcome = comparison.result
    else:
        result = outcome = llm.generate(prompts, params, spec, progress=progress)
    if not leader:
        return 0
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_summary(outcome, llm)
        if isinstance(result, Comparison):
            print_comparison(result)
    return 0


def print_summary(result: GenerationResult, llm: LLM, out: Any = sys.stdout) -> None:
    for i, o in enumerate(result.outputs):
        head = llm.tokenizer.decode(o.prompt_token_ids[-24:]).replace("\n", " ")
        print(f"--- sequence {i}: {len(o.prompt_token_ids)} prompt tokens, {len(o.token_ids)} generated "
              f"({o.finish_reason})", file=out)
        print(f"    …{head}", file=out)
        print(f">>> {o.text}", file=out)
    s = result.stats
    print(f"\nbatch {s.batch}, {s.prompt_tokens} prompt tokens: prefill {s.prefill_s:.2f} s; "
          f"decode {s.generated_tokens} tokens in {s.decode_s:.2f} s = {s.tokens_per_s:.1f} tokens/s", file=out)
    if s.method != "none":
        rate = "none drafted" if s.acceptance_rate is None else f"{s.acceptance_rate:.1%}"
        print(f"speculation ({s.method}): acceptance {rate} of {s.acceptance.draft_tokens} drafted "
              "tokens, "
              f"{s.mean_accepted_tokens:.2f} tokens per verification; draft {s.draft_s:.2f} s, "
              f"verify {s.verify_s:.2f} s", file=out)


def print_comparison(c: Comparison, out: Any = sys.stdout) -> None:
    b, r = c.baseline.stats, c.result.stats
    steady = c.steady_speedup
    print(f"like for like ({len(c.runs)} plain and {len(c.runs)} speculative runs, alternating, every prompt admitted "
          f"at once from the same warm prefix cache; medians):\n"
          f"  whole run:    plain {b.tokens_per_s:.1f} tokens/s, {c.spec.label} {r.tokens_per_s:.1f} tokens/s "
          f"-> speedup {c.speedup:.2f}x\n"
          f"  steady state: " + (f"plain {b.extra['steady_tokens_per_s']:.1f} tokens/s, speculative "
                                 f"{r.extra['steady_tokens_per_s']:.1f} tokens/s -> speedup {steady:.2f}x"
                                 if steady else "no step with every request decoding")
          + (f"\n  outputs identical: {'yes' if c.matches_plain else 'NO'}" if c.greedy else ""), file=out)
