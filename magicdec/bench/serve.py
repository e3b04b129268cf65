"""`magicdec bench serve`: a load generator for any OpenAI-compatible `/v1/completions` endpoint.

The trace is `magicdec.bench.trace`'s (`make_trace`: seeded prompt and output lengths, Poisson arrivals at
`rate` or closed-loop `concurrency`, replayed by `Arrivals`); the prompts are cut from the corpus with a
local tokenizer to exact token lengths and sent as token-id lists. Every request streams
(`stream_options.include_usage`), greedy (`temperature` 0), with `ignore_eos` and `return_token_ids`
when the server takes them (a one-token probe per configuration drops the extensions a server refuses
with a 400 that names them; it also warms the server up). A configuration is a name and an extra body
merged into every request (`{"speculation": {"gamma": 0}}`: magicdec serve without speculation); several
run one after another on the same trace, the first one the reference of the greedy-token comparison.

Per request (`trace.RequestResult`): the scheduled arrival, each streamed chunk's time (its tokens arrive
together), the end, the completion tokens (usage), the prompt's cached tokens and the server's
`usage.speculation`, if any. Per configuration: `trace.summary_record`'s throughputs and latency
distributions, goodput (requests/s meeting every SLO given), and the errors by status code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magicdec.bench.trace import (
    Arrivals,
    ConfigRun,
    RequestResult,
    Trace,
    TraceConfig,
    TraceRequest,
    _dist,
    _f,
    _yes,
    distribution,
    plot,
    read_results,
    request_record,
    summary_record,
)
from magicdec.engine.outputs import Acceptance
from magicdec.loading import Tokenizer

EXTENSIONS = ("ignore_eos", "return_token_ids", "stream_options")  # dropped when a server refuses them
SLO_KEYS = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_max_s", "e2e": "e2e_s"}
DEFINITIONS = {
    "ttft_s": "first streamed token's time − the request's scheduled arrival",
    "tpot_s": "(e2e − TTFT) / (completion tokens − 1)",
    "itl_s": "gaps between successive streamed chunks carrying tokens (a chunk's tokens arrive together)",
    "e2e_s": "the stream's end − the scheduled arrival",
    "output_tokens_per_s": "completion tokens of the successful requests / makespan (first arrival → last finish)",
    "requests_per_s": "successful requests / makespan",
    "goodput_rps": "successful requests meeting every SLO given (--goodput) / makespan",
    "matches_reference": "every request's greedy token ids equal the first configuration's (same invocation), "
                         "or those of the first run given to --report with the same trace",
}


# ---- options -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServeConfig:
    name: str
    extra_body: dict[str, Any] = field(default_factory=dict)


def parse_configs(items: Sequence[str]) -> list[ServeConfig]:
    """'NAME=JSON' (or 'NAME': no extra body) → configurations."""
    out = []
    for item in items:
        name, _, body = item.partition("=")
        if not name:
            raise ValueError(f"a configuration is NAME=JSON, got {item!r}")
        out.append(ServeConfig(name, parse_extra_body(body) if body.strip() else {}))
    if len({c.name for c in out}) != len(out):
        raise ValueError("configuration names must differ")
    return out


def parse_extra_body(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the extra body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"the extra body must be a JSON object, got {text!r}")
    return body


def parse_goodput(text: str | None) -> dict[str, float]:
    """'ttft:2,tpot:0.2' → {"ttft": 2.0, "tpot": 0.2} (seconds; keys ttft, tpot, itl (a request's largest
    gap), e2e)."""
    slos: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition(":")
        key = key.strip().lower()
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO {key!r}: choose among {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"SLO {key}: expected seconds, got {value!r}") from None
    return slos


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face directory or GGUF file (default: the built-in model's), no weights."""
    from magicdec.loading import LoadError, builtin_model_path, gguf_cache_dir

    p = builtin_model_path() if path is None else Path(path).expanduser()
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.is_file():
        return Tokenizer.from_gguf(p, gguf_cache_dir(p))
    raise LoadError(f"no tokenizer at {p}: give a Hugging Face directory or a .gguf file")


# ---- the client --------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    """A request's result and what the trace's `RequestResult` does not hold."""

    result: RequestResult
    status: int | None = None  # HTTP status; None: no answer (connection error)
    error: str | None = None
    ids_known: bool = True  # the server returned token ids (else `result.token_ids` are placeholders)
    speculation: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ServeError(ValueError):
    """The server cannot run the benchmark at all (nothing listens, a refused key, model or body): one line,
    said before anything is measured or written."""


def server_message(r: Any) -> str:
    """The error message of an OpenAI-style error body, else the body's start, on one line."""
    try:
        body = r.json()
        text = body["error"]["message"] if isinstance(body.get("error"), dict) else str(body.get("detail", body))
    except (ValueError, AttributeError, KeyError, TypeError):
        text = r.text
    return " ".join(str(text).split())[:300] or r.reason_phrase


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        try:
            import httpx
        except ImportError:
            raise ValueError("magicdec bench serve needs httpx: pip install httpx") from None
        self.httpx = httpx
        self.base_url, self.keyed = base_url, bool(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=30.0),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        await self.http.aclose()

    def refused(self, r: Any, what: str, fix: str) -> ServeError:
        """The error for a refused `what` (a request), naming the flag that fixes it."""
        if r.status_code == 401:
            fix = ("give the server's key with --api-key" if not self.keyed
                   else "the key given with --api-key is not the server's")
        return ServeError(f"{self.base_url}: {what} was refused ({r.status_code}: {server_message(r)}): {fix}")

    async def get_or_post(self, method: str, url: str, **kw: Any) -> Any:
        """One request; a connection failure is a `ServeError` naming the URL."""
        try:
            return await self.http.request(method, url, **kw)
        except self.httpx.HTTPError as exc:
            raise ServeError(f"nothing answers at {self.base_url} ({type(exc).__name__}: {exc or 'no answer'}): "
                             "start the server (magicdec serve) or fix --base-url") from None

    async def first_model(self) -> str:
        r = await self.get_or_post("GET", "/models")
        if r.status_code != 200:
            raise self.refused(r, "GET /models", "check --base-url (…/v1) or give --model")
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ServeError(f"{self.base_url}: GET /models answered no model ({r.text[:200]!r}): check --base-url "
                             "or give --model") from None

    def body(self, model: str, prompt: list[int], max_tokens: int, extra: dict[str, Any],
             dropped: set[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                                "return_token_ids": True}
        return {**{k: v for k, v in body.items() if k not in dropped}, **extra}

    async def probe(self, model: str, prompt: list[int], config: ServeConfig) -> set[str]:
        """A one-token streamed request (the server's warm-up): the extensions the server refuses (a 400
        naming them) are dropped; any other refusal is a `ServeError`."""
        dropped: set[str] = set()
        while True:
            body = self.body(model, prompt[:16], 1, config.extra_body, dropped)
            r = await self.get_or_post("POST", "/completions", json=body)
            if r.status_code == 200:
                return dropped
            named = [k for k in EXTENSIONS if k not in dropped and k in r.text]
            if r.status_code != 400 or not named:
                fix = (f"check --model {model}" if r.status_code == 404 or "model" in r.text.lower()
                       else f"fix the extra body of {config.name!r} (--extra-body or --configs)")
                raise self.refused(r, f"the first request of {config.name!r}", fix)
            dropped.update(named)

    async def stream(self, model: str, req: TraceRequest, arrival: float, extra: dict[str, Any],
                     dropped: set[str]) -> Outcome:
        res = RequestResult(req.index, len(req.prompt), arrival)
        out = Outcome(res)
        ids: list[int] = []
        completion: int | None = None
        chunks = 0
        try:
            async with self.http.stream("POST", "/completions",
                                        json=self.body(model, req.prompt, req.output_len, extra, dropped)) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    out.error = (await r.aread()).decode(errors="replace")[:500]
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    msg = json.loads(data)
                    now = time.monotonic()
                    if "error" in msg:
                        out.error = json.dumps(msg["error"])[:500]
                        return out
                    for choice in msg.get("choices") or []:
                        got = choice.get("token_ids")
                        if got is not None:
                            ids += got
                            res.token_times += [now] * len(got)
                        elif choice.get("text"):
                            chunks += 1
                            res.token_times.append(now)
                    usage = msg.get("usage")
                    if usage:
                        completion = usage.get("completion_tokens")
                        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        spec = usage.get("speculation")
                        if spec:
                            out.speculation = spec
                            res.acceptance = Acceptance(rounds=spec.get("num_drafts") or 0,
                                                        draft_tokens=spec.get("draft_tokens") or 0,
                                                        accepted_tokens=spec.get("accepted_tokens") or 0)
                res.finished = time.monotonic()
        except (self.httpx.HTTPError, ValueError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            return out
        if ids and (completion is None or completion == len(ids)):
            res.token_ids = ids
        else:  # no ids (or they disagree with usage): count only
            out.ids_known = False
            res.token_ids = [-1] * (completion if completion is not None else len(ids) or chunks)
        if not res.token_times and res.token_ids:
            res.token_times = [res.finished] * len(res.token_ids)
        return out


async def replay(client: Client, model: str, trace: Trace, config: ServeConfig, dropped: set[str],
                 progress: Callable[[int], None] | None = None) -> tuple[float, list[Outcome]]:
    """`trace` against the server in real time; (the start, every request's outcome by index)."""
    start = time.monotonic()
    arrivals = Arrivals(trace, start)
    pending: set[asyncio.Task[Outcome]] = set()
    outcomes: list[Outcome] = []
    while not arrivals.done or pending:
        for r, at in arrivals.due(time.monotonic()):
            pending.add(asyncio.create_task(client.stream(model, r, at, config.extra_body, dropped)))
        nxt = arrivals.next_time()
        wait = None if nxt is None else max(0.0, nxt - time.monotonic())
        if not pending:
            await asyncio.sleep(wait or 0.0)
            continue
        done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            o = task.result()
            outcomes.append(o)
            arrivals.freed(o.result.finished or time.monotonic())
            if progress is not None:
                progress(1)
    return start, sorted(outcomes, key=lambda o: o.result.index)


# ---- records -----------------------------------------------------------------------------------------------

def meets(rec: dict[str, Any], slos: dict[str, float]) -> bool:
    """A successful request's record meets every SLO (a missing figure, e.g. TPOT of one token, meets it)."""
    return all(rec.get(SLO_KEYS[k]) is None or rec[SLO_KEYS[k]] <= v for k, v in slos.items())


def records(config: ServeConfig, start: float, outcomes: list[Outcome], slos: dict[str, float],
            reference: dict[int, str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The request records and the summary of one configuration's run (`reference`: request → token digest)."""
    tc = TraceConfig(config.name, "served", None)
    good = [o for o in outcomes if o.ok]
    run = ConfigRun(tc, start, [o.result for o in good])
    recs = []
    for o in outcomes:
        rec = request_record(run, o.result, None)
        for k in ("kind", "gamma", "rounds", "preemptions"):
            rec.pop(k, None)
        known = o.ok and o.ids_known
        rec.update(extra_body=config.extra_body, status=o.status, error=o.error, ids_known=known,
                   speculation=o.speculation)
        if not known:
            rec["tokens_sha1"] = None
        if o.ok and slos:
            rec["meets_slos"] = meets(rec, slos)
        if reference is not None and known and o.result.index in reference:
            rec["matches_reference"] = rec["tokens_sha1"] == reference[o.result.index]
        recs.append(rec)
    return recs, summarize(config, run, recs, slos)


def summarize(config: ServeConfig, run: ConfigRun, recs: list[dict[str, Any]],
              slos: dict[str, float]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for r in recs:
        if r["error"] is not None:
            key = str(r["status"]) if r["status"] is not None else "no answer"
            errors[key] = errors.get(key, 0) + 1
    ok = [r for r in recs if r["error"] is None]
    if run.results:
        s = summary_record(run, None, None)
        span = s["makespan_s"]
    else:
        span = None
        empty = distribution([])
        s = {"type": "summary", "config": config.name, "requests": 0, "output_tokens": 0, "makespan_s": None,
             "output_tokens_per_s": None, "requests_per_s": None, "acceptance_rate": None,
             "mean_accepted_tokens": None, **{k: empty for k in ("ttft_s", "tpot_s", "itl_s", "itl_max_s", "e2e_s")}}
    for k in ("kind", "gamma", "budget", "sinks", "throughput_vs_plain", "decode_tokens_per_s", "decode_vs_plain",
              "gamma_counts", "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate", "preemptions",
              "no_leaks", "leak_error", "batches", "rounds", "mismatched_requests", "matches_reference"):
        s.pop(k, None)
    n_good = sum(1 for r in ok if meets(r, slos)) if slos else None
    compared = [r["matches_reference"] for r in ok if r.get("matches_reference") is not None]
    s.update(extra_body=config.extra_body, sent=len(recs), errors=errors,
             slos=slos or None, good_requests=n_good,
             goodput_rps=n_good / span if n_good is not None and span else None,
             matches_reference=None if not compared else all(compared),
             mismatched_requests=[r["request"] for r in ok if r.get("matches_reference") is False],
             ids_known=all(r["ids_known"] for r in ok) if ok else None, kind="served")
    return s


# ---- the benchmark -----------------------------------------------------------------------------------------

@dataclass(slots=True)
class ServeResult:
    model: str
    dropped: dict[str, list[str]]  # configuration → the extensions its probe dropped
    requests: list[dict[str, Any]]
    summaries: list[dict[str, Any]]

    @property
    def problems(self) -> list[str]:
        out = []
        for s in self.summaries:
            if s["errors"]:
                out.append(f"{s['config']}: errors by status {s['errors']}")
            if s["matches_reference"] is False:
                out.append(f"{s['config']}: greedy tokens differ from the reference's for requests "
                           f"{s['mismatched_requests']}")
        return out


async def run_serve_async(base_url: str, trace: Trace, configs: Sequence[ServeConfig], *, model: str | None = None,
                          api_key: str | None = None, slos: dict[str, float] | None = None, warmup: bool = True,
                          write: Callable[[dict[str, Any]], None] | None = None,
                          progress: Callable[[str, int, int], None] | None = None,
                          on_model: Callable[[str], None] | None = None) -> ServeResult:
    slos = slos or {}
    client = Client(base_url, api_key)
    try:
        model = model or await client.first_model()
        if on_model is not None:
            on_model(model)
        result = ServeResult(model, {}, [], [])
        reference: dict[int, str] | None = None
        for c in configs:  # every configuration's probe first: one the server refuses fails before any is measured
            result.dropped[c.name] = sorted(await client.probe(model, trace.requests[0].prompt, c) if warmup else ())
        for c in configs:
            dropped = set(result.dropped[c.name])
            tick = (lambda n, c=c: progress(c.name, n, len(trace.requests))) if progress else None
            start, outcomes = await replay(client, model, trace, c, dropped, tick)
            if not any(o.ok for o in outcomes):
                first = outcomes[0]
                raise ServeError(f"{c.name}: every request failed; the first with "
                                 f"{first.status or 'no answer'}: {' '.join(str(first.error).split())[:300]}")
            recs, summary = records(c, start, outcomes, slos, reference)
            summary["dropped_extensions"] = sorted(dropped)
            if reference is None:
                reference = {r["request"]: r["tokens_sha1"] for r in recs if r["tokens_sha1"] is not None}
                summary["reference"] = None
            else:
                summary["reference"] = configs[0].name
            for rec in [*recs, summary]:
                if write is not None:
                    write(rec)
            result.requests += recs
            result.summaries.append(summary)
        return result
    finally:
        await client.close()


def run_serve(base_url: str, trace: Trace, configs: Sequence[ServeConfig], **kw: Any) -> ServeResult:
    """Every configuration on `trace` against the server at `base_url` (…/v1), one after another."""
    return asyncio.run(run_serve_async(base_url, trace, configs, **kw))


# ---- report ------------------------------------------------------------------------------------------------

def markdown(head: dict[str, Any], summaries: list[dict[str, Any]]) -> str:
    tr = head.get("trace", {})
    arrivals = (f"Poisson, {tr['rate']} req/s" if tr.get("rate") is not None
                else f"closed loop, concurrency {tr.get('concurrency')}")
    pl, ol = tr.get("prompt_lens") or [0], tr.get("output_lens") or [0]
    slos = next((s["slos"] for s in summaries if s.get("slos")), None)
    lines = [f"Command: `{head.get('command', '?')}`  ",
             f"Date: {head.get('date', '?')}; endpoint: {head.get('base_url', '?')}; model: {head.get('model', '?')}; "
             f"corpus: {head.get('corpus', '?')}  ",
             f"Trace: {tr.get('requests', '?')} requests, {arrivals}; prompts {min(pl)}–{max(pl)} tokens, outputs "
             f"{min(ol)}–{max(ol)} tokens (greedy, EOS ignored); seed {tr.get('seed', '?')}", "",
             "Latencies: mean / p50 / p90 / p99. TTFT and e2e in s, TPOT and ITL in ms."
             + (" Goodput SLOs: " + ", ".join(f"{k} ≤ {v} s" for k, v in slos.items()) + "." if slos else ""), "",
             "| run | extra body | ok / sent | errors | out tok/s | req/s | goodput req/s | makespan s | TTFT s | "
             "TPOT ms | ITL ms | e2e s | acceptance | mean accepted | = ref |",
             "|" + "---|" * 15]
    for s in summaries:
        errors = ", ".join(f"{k}×{n}" for k, n in (s.get("errors") or {}).items()) or "—"
        lines.append("| " + " | ".join([
            s["config"], f"`{json.dumps(s.get('extra_body') or {})}`", f"{s['requests']} / {s.get('sent', '?')}",
            errors, _f(s["output_tokens_per_s"], ".1f"), _f(s["requests_per_s"], ".3f"),
            _f(s.get("goodput_rps"), ".3f"),
            _f(s["makespan_s"], ".1f"), _dist(s["ttft_s"], 1, ".2f"), _dist(s["tpot_s"], 1e3, ".1f"),
            _dist(s["itl_s"], 1e3, ".1f"), _dist(s["e2e_s"], 1, ".2f"), _f(s.get("acceptance_rate")),
            _f(s.get("mean_accepted_tokens")), _yes(s.get("matches_reference"))]) + " |")
    for s in summaries:
        if s.get("matches_reference") is False:
            lines += ["", f"> **{s['config']}: greedy tokens differ from {s.get('reference')}'s** "
                          f"(requests {s.get('mismatched_requests')})"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, head: dict[str, Any], requests: list[dict[str, Any]],
                 summaries: list[dict[str, Any]]) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "results.md"
    table.write_text(markdown(head, summaries))
    plotted = [{**s, "throughput_vs_plain": None} for s in summaries]
    return [table, plot([r for r in requests if r.get("error") is None], plotted, out_dir / "serve.png")]


def merge_runs(dirs: Sequence[Path]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Several runs' results.jsonl as one (the first run's header; names made unique; the greedy tokens
    compared with the first run's first configuration where the traces are equal)."""
    head: dict[str, Any] = {}
    requests: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    reference: tuple[str, dict[int, str]] | None = None
    names: set[str] = set()
    for d in dirs:
        h, reqs, sums = read_results(Path(d) / "results.jsonl")
        if not head:
            head = {**h, "runs": [str(x) for x in dirs]}
        same_trace = h.get("trace") == head.get("trace")
        for s in sums:
            name = s["config"]
            if name in names:
                name = f"{Path(d).name}:{name}"
            names.add(name)
            mine = [r for r in reqs if r["config"] == s["config"]]
            if reference is None:
                reference = (name, {r["request"]: r["tokens_sha1"] for r in mine if r.get("tokens_sha1")})
            elif same_trace:
                got = [(r["request"], r["tokens_sha1"] == reference[1].get(r["request"])) for r in mine
                       if r.get("tokens_sha1") and r["request"] in reference[1]]
                s = {**s, "matches_reference": all(m for _, m in got) if got else None,
                     "mismatched_requests": [i for i, m in got if not m], "reference": reference[0]}
            summaries.append({**s, "config": name})
            requests += [{**r, "config": name} for r in mine]
    return head, requests, summaries

