"""magicdec: long-context LLM inference with speculative decoding whose drafts use a sparse KV cache.

    from magicdec import LLM, Engine, SamplingParams, SpecConfig
    llm = LLM()  # the built-in SmolLM2-135M-Instruct, or LLM("path/to/hf_dir_or.gguf")
    result = llm.generate(prompts, SamplingParams(max_new_tokens=64), spec=SpecConfig(method="self"))
    engine = Engine(spec=SpecConfig(method="self"))  # requests over time: add_request / step / stream
"""

from magicdec.config import ModelConfig
from magicdec.engine.config import EngineConfig
from magicdec.engine.outputs import Acceptance, GenerationResult, RunStats
from magicdec.engine.request import StepOutput
from magicdec.llm import LLM, PromptError
from magicdec.loading import LoadError, load_model
from magicdec.runtime.sampling import SamplingParams
from magicdec.serving import Engine
from magicdec.spec.config import Auto, DraftTuning, SpecConfig

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
