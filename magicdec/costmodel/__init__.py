"""Planning: the analytical cost model of speculative decoding with sparse-KV drafts, and the γ policies.

- `hardware`: `HardwareProfile`, the built-in datasheet profiles, `load_profile` / `save_profile`;
- `shapes`: known model shapes by name, `resolve_model`;
- `steps`: bytes/FLOPs and roofline time of target, verification and draft steps, `CostModel`;
- `experts`: the experts a mixture-of-experts step reads (uniform or measured `Routing`), MoE weight bytes;
- `analysis`: Ω(γ, α), the speedup of paper Eq. 1, best γ, critical context length;
- `device`: which profile describes this device (a saved `magicdec profile`, else a built-in);
- `placement`: whether a draft model is sharded or replicated under tensor parallelism;
- `policy`: the γ policies (`FixedGamma`, `AutoGamma`), which read the engine's round reports.
"""

from magicdec.costmodel.analysis import best_gamma, critical_context, omega, speedup, time_ratio
from magicdec.costmodel.hardware import BUILTIN_PROFILES, HardwareProfile, load_profile, save_profile
from magicdec.costmodel.shapes import KNOWN_SHAPES, known_model_names, resolve_model
from magicdec.costmodel.steps import CostModel, DraftSpec, StepCost, count_step, step_time

__all__ = [
    "BUILTIN_PROFILES",
    "KNOWN_SHAPES",
    "CostModel",
    "DraftSpec",
    "HardwareProfile",
    "StepCost",
    "best_gamma",
    "count_step",
    "critical_context",
    "known_model_names",
    "load_profile",
    "omega",
    "resolve_model",
    "save_profile",
    "speedup",
    "step_time",
    "time_ratio",
]
