"""magicdec: long-context LLM inference with speculative decoding whose drafts use a sparse KV cache.

    from magicdec import LLM, Engine, SamplingParams, SpecConfig
    llm = LLM()  # the built-in SmolLM2-135M-Instruct, or LLM("path/to/hf_dir_or.gguf")
    result = llm.generate(prompts, SamplingParams(max_new_tokens=64), spec=SpecConfig(method="self"))
    engine = Engine(spec=SpecConfig(method="self"))  # requests over time: add_request / step / stream

The names below are imported on first use, so that `import magicdec.cli.main` (the `magicdec` command)
costs nothing before it can catch a Ctrl-C.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magicdec.config import ModelConfig
    from magicdec.engine.config import EngineConfig
    from magicdec.engine.outputs import Acceptance, GenerationResult, RunStats, StepOutput
    from magicdec.llm import LLM, PromptError
    from magicdec.loading import LoadError, load_model
    from magicdec.runtime.sampling import SamplingParams
    from magicdec.serving import Engine
    from magicdec.spec.config import Auto, DraftTuning, SpecConfig

_HOMES = {
    "ModelConfig": "magicdec.config",
    "Acceptance": "magicdec.engine.outputs",
    "GenerationResult": "magicdec.engine.outputs",
    "EngineConfig": "magicdec.engine.config",
    "StepOutput": "magicdec.engine.request",
    "RunStats": "magicdec.engine.outputs",
    "LLM": "magicdec.llm",
    "PromptError": "magicdec.llm",
    "LoadError": "magicdec.loading",
    "load_model": "magicdec.loading",
    "SamplingParams": "magicdec.runtime.sampling",
    "Engine": "magicdec.serving",
    "Auto": "magicdec.spec.config",
    "DraftTuning": "magicdec.spec.config",
    "SpecConfig": "magicdec.spec.config",
}

__all__ = [
    "LLM",
    "Acceptance",
    "Auto",
    "DraftTuning",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "LoadError",
    "ModelConfig",
    "PromptError",
    "RunStats",
    "SamplingParams",
    "SpecConfig",
    "StepOutput",
    "load_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'magicdec' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
