"""lm-eval's `local-completions` model against `magicdec serve` (self-speculation) gives the scores of lm-eval's
`hf` model on the same checkpoint: a log-likelihood task (echo + logprobs, the prompt's log-probabilities) and
a generate-until task, both made from Austen's opening lines. Per-sample log-likelihoods agree to 1e-3 and the
greedy generations are identical."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_server import ENGINE, MODEL, ServerProcess, started

from magicdec.loading import builtin_model_path, gguf_cache_dir

pytestmark = pytest.mark.slow

DOCS = [
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
     "of a", [" wife.", " horse.", " house."]),
    ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
     "some of the best blessings of", [" existence.", " the sea.", " winter."]),
    ("The family of Dashwood had long been settled in", [" Sussex.", " Paris.", " the moon."]),
    ("No one who had ever seen Catherine Morland in her infancy would have supposed her born to be an",
     [" heroine.", " engineer.", " astronaut."]),
]
TASKS = """\
task: austen_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{context}}}}"
"""
MC = "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n" \
     "metric_list:\n  - metric: acc\n"
GEN = "output_type: generate_until\ndoc_to_target: \"{{choices[0]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n" \
      "  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*ENGINE, "--max-num-seqs", "4", "--spec", "self", "--budget", "64", "--gamma", "2"]
    yield from started(tmp_path_factory.mktemp("serve"), "lm_eval", args)


def tasks(tmp: Path) -> Path:
    data = tmp / "austen.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": 0}) + "\n" for c, ch in DOCS))
    for kind, body in (("mc", MC), ("gen", GEN)):
        (tmp / f"austen_{kind}.yaml").write_text(TASKS.format(kind=kind, data=data) + body)
    return tmp


def evaluate(model: Any, task_dir: Path) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=["austen_mc", "austen_gen"], log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir)))


def responses(result: dict[str, Any], task: str) -> list[Any]:
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_local_completions_scores_equal_hf(server: ServerProcess, tmp_path: Path, threads: None) -> None:
    pytest.importorskip("lm_eval", reason="pip install 'lm-eval[api]' (in the test extra)")
    from lm_eval.models.api_models import TemplateAPI
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    torch.set_num_threads(1)
    checkpoint = gguf_cache_dir(builtin_model_path())  # the built-in model converted (by the server) for transformers
    local = LocalCompletionsAPI(model=MODEL, base_url=f"{server.url}/v1/completions", tokenizer=str(checkpoint),
                                tokenizer_backend="huggingface", num_concurrent=1, max_retries=1)
    assert isinstance(local, TemplateAPI)
    task_dir = tasks(tmp_path)
    served = evaluate(local, task_dir)
    hf = evaluate(HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=1), task_dir)
    assert served["results"]["austen_mc"]["acc,none"] == hf["results"]["austen_mc"]["acc,none"]
    assert served["results"]["austen_gen"]["exact_match,none"] == hf["results"]["austen_gen"]["exact_match,none"]
    for a, b in zip(responses(served, "austen_mc"), responses(hf, "austen_mc")):
        for (x,), (y,) in zip(a, b):
            assert abs(float(x[0]) - float(y[0])) < 1e-3 and x[1] == y[1], (a, b)
    assert responses(served, "austen_gen") == responses(hf, "austen_gen")
    assert all(r[0][0] for r in responses(served, "austen_gen"))  # something was generated
