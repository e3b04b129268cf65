"""The cost model of mixture-of-experts steps: expected distinct experts, their bytes, and what follows for γ."""

from __future__ import annotations

import io
import json
import random
import statistics
from contextlib import redirect_stderr, redirect_stdout

import pytest

from magicdec.bench.policy_sim import Noise, StepTimes, simulate
from magicdec.cli import plan
from magicdec.costmodel import CostModel, DraftSpec, critical_context, load_profile, resolve_model
from magicdec.costmodel.experts import (
    Routing,
    active_parameters,
    expected_active_experts,
    load_routing,
    moe_layer_count,
    stored_weight_bytes,
)
from magicdec.costmodel.policy import AutoGamma, BatchView, StepReport
from magicdec.costmodel.steps import count_step

H100 = load_profile("h100")
QWEN_MOE = resolve_model("qwen3-30b-a3b")
# Qwen3-30B-A3B's shape with one dense MLP of the width of its 8 active experts: equal active bytes per token
QWEN_DENSE = QWEN_MOE.with_(n_experts=0, n_experts_per_token=0, moe_intermediate_size=0, intermediate_size=8 * 768)
SELF = DraftSpec("self", 512)


def _model(cfg, draft=SELF, **kw) -> CostModel:  # noqa: ANN001
    return CostModel(cfg, H100, draft, **kw)


def test_expected_experts_limits_and_a_simulation_of_uniform_top_k() -> None:
    small = QWEN_MOE.with_(n_experts=8, n_experts_per_token=2)
    assert expected_active_experts(QWEN_MOE, 1) == pytest.approx(8)  # one token: its k experts
    assert expected_active_experts(QWEN_MOE, 10_000) == pytest.approx(128)  # many: every expert
    assert expected_active_experts(QWEN_MOE, 0) == 0 and expected_active_experts(QWEN_DENSE, 64) == 0
    counts = [expected_active_experts(QWEN_MOE, n) for n in range(1, 80)]
    assert all(a < b for a, b in zip(counts, counts[1:]) if b < 127.9)
    assert expected_active_experts(small, 3) == pytest.approx(8 * (1 - 0.75 ** 3))
    rng = random.Random(0)
    trials = 4000
    for n in (2, 3, 6):
        seen = sum(len(set().union(*(rng.sample(range(8), 2) for _ in range(n)))) for _ in range(trials))
        assert seen / trials == pytest.approx(expected_active_experts(small, n), rel=0.03), n


def test_measured_routing_replaces_the_uniform_assumption(tmp_path) -> None:  # noqa: ANN001
    uniform = Routing([[8 / 128] * 128])
    assert uniform.expected_experts(9) == pytest.approx(expected_active_experts(QWEN_MOE, 9))
    # a routing that only ever uses 16 experts reads at most 16, however many tokens
    narrow = Routing.from_counts([5.0] * 16 + [0.0] * 112, top_k=8)
    assert narrow.expected_experts(1) == pytest.approx(8) and narrow.expected_experts(1000) == pytest.approx(16)
    per_layer = Routing.from_counts([[1.0] * 128, [5.0] * 16 + [0.0] * 112] * 24, top_k=8)
    assert per_layer.expected_experts(40) == pytest.approx(
        (expected_active_experts(QWEN_MOE, 40) + narrow.expected_experts(40)) / 2)
    assert expected_active_experts(QWEN_MOE, 40, per_layer, layer=1) == pytest.approx(narrow.expected_experts(40))
    skewed = _model(QWEN_MOE, routing=narrow)
    assert skewed.t_verify(8, 8192, 4) < _model(QWEN_MOE).t_verify(8, 8192, 4)
    assert skewed.t_target(1, 8192) == pytest.approx(_model(QWEN_MOE).t_target(1, 8192))  # one token: k either way
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"counts": [5] * 16 + [0] * 112}))
    assert load_routing(path, 8).probs == narrow.probs
    with pytest.raises(ValueError, match="routing lists 16 experts, the model has 128"):
        _model(QWEN_MOE, routing=Routing([[0.5] * 16]))
    with pytest.raises(ValueError, match="one per MoE layer"):
        _model(QWEN_MOE, routing=Routing([[8 / 128] * 128] * 3))
    with pytest.raises(ValueError, match="without experts"):
        _model(QWEN_DENSE, routing=uniform)


def test_one_expert_always_read_costs_what_the_dense_mlp_does() -> None:
    dense = resolve_model("llama-3.1-8b")
    moe = dense.with_(n_experts=1, n_experts_per_token=1)
    ops_d = {op.name: op for op in count_step(dense, 8, 5, 8 * 8192.0).ops}
    ops_m = {op.name: op for op in count_step(moe, 8, 5, 8 * 8192.0).ops}
    assert "mlp_gate_up" not in ops_m and {"router", "experts_gate_up", "experts_down"} <= set(ops_m)
    for d_name, m_name in (("mlp_gate_up", "experts_gate_up"), ("mlp_down", "experts_down")):
        assert ops_m[m_name].bytes == pytest.approx(ops_d[d_name].bytes)
        assert ops_m[m_name].flops == pytest.approx(ops_d[d_name].flops)
    assert [op.name for op in count_step(dense, 1, 1, 1.0).ops] == [
        "qkv", "attention", "kv_write", "o_proj", "mlp_gate_up", "mlp_down", "lm_head", "embedding"]
    # dense layers of a MoE keep their dense MLP
    mixed = QWEN_MOE.with_(dense_layers=(0, 1))
    assert moe_layer_count(mixed) == 46
    names = [op.name for op in count_step(mixed, 1, 1, 1.0).ops]
    assert "mlp_gate_up" in names and "experts_gate_up" in names


def test_verification_grows_with_gamma_for_a_moe_and_stays_flat_for_a_dense_model() -> None:
    moe, dense = _model(QWEN_MOE), _model(QWEN_DENSE)
    for b in (1, 4, 8):
        tt = moe.t_target(b, 8192)
        ratios = [moe.t_verify(b, 8192, g) / tt for g in range(0, 9)]
        assert all(a < c for a, c in zip(ratios, ratios[1:])) and ratios[4] > 1.5, (b, ratios)
        assert dense.t_verify(b, 8192, 4) / dense.t_target(b, 8192) < 1.02
    # at batch 1 both read the same bytes: k experts = the dense MLP
    assert moe.t_target(1, 8192) == pytest.approx(dense.t_target(1, 8192), rel=0.01)
    # once a decode step's tokens read every expert, verifying more adds little
    assert moe.t_verify(128, 8192, 4) / moe.t_target(128, 8192) < 1.1


def test_auto_gamma_and_the_per_request_threshold_weigh_the_experts_verification_brings_in() -> None:
    moe, dense = _model(QWEN_MOE), _model(QWEN_DENSE)
    for b, n in ((4, 32768), (8, 32768), (16, 8192), (32, 32768), (8, 131072)):
        g_moe, s_moe = moe.best_gamma(b, n, 0.8)
        g_dense, s_dense = dense.best_gamma(b, n, 0.8)
        assert g_moe < g_dense and s_moe < s_dense, (b, n)
    view = BatchView([32768] * 8, [100] * 8)
    thresholds = []
    for cost in (moe, dense):
        auto = AutoGamma(cost, 8)
        auto.choose(view)
        thresholds.append(auto.token_threshold(2))
    assert thresholds[0] > 3 * thresholds[1] > 0  # one more verified position costs the MoE its new experts


class _Recording:
    """A γ policy that records what the policy it wraps chooses."""

    def __init__(self, policy: AutoGamma) -> None:
        self.policy, self.chosen = policy, []

    def choose(self, view: BatchView) -> int:
        self.chosen.append(self.policy.choose(view))
        return self.chosen[-1]

    def observe(self, report: StepReport) -> None:
        self.policy.observe(report)

    def stats(self) -> dict:
        return {}


def test_auto_gamma_run_on_the_models_own_step_times_settles_lower_for_the_moe() -> None:
    chosen = {}
    for name, cost in (("moe", _model(QWEN_MOE)), ("dense", _model(QWEN_DENSE))):
        b, n = 16, 32768
        times = StepTimes(cost.t_target(b, n), cost.t_draft(b, n), {g: cost.t_verify(b, n, g) for g in range(1, 9)},
                          H100.round_overhead_s)
        auto = _Recording(AutoGamma(cost, 8))
        simulate(auto, times, b, n, 256, 0.8, random.Random(1), Noise(step=0.0, drift=0.0, alpha_spread=0.0))
        chosen[name] = statistics.mode(g for g in auto.chosen if g)  # the speculative γ it settles on
    assert chosen["moe"] == _model(QWEN_MOE).best_gamma(16, 32768, 0.8)[0] == 2
    assert chosen["dense"] == _model(QWEN_DENSE).best_gamma(16, 32768, 0.8)[0] == 4


def test_presets_have_published_sizes_and_gpt_oss_experts_weigh_4_25_bits() -> None:
    total = {"qwen3-30b-a3b": 30.5e9, "gpt-oss-20b": 20.9e9, "gpt-oss-120b": 116.8e9, "mixtral-8x7b": 46.7e9}
    active = {"qwen3-30b-a3b": 3.35e9, "gpt-oss-20b": 4.19e9, "gpt-oss-120b": 5.71e9, "mixtral-8x7b": 12.9e9}
    for name, n in total.items():
        cfg = resolve_model(name)
        assert stored_weight_bytes(cfg.with_(expert_weight_bits=0), 2) / 2 == pytest.approx(n, rel=0.01), name
        assert active_parameters(cfg) == pytest.approx(active[name], rel=0.01), name
    oss = resolve_model("openai/gpt-oss-120b")
    assert oss.layer_windows[:2] == (128, 0) and oss.n_global_layers == 18 and oss.expert_weight_bits == 4.25
    assert stored_weight_bytes(oss, 2) / 1e9 == pytest.approx(65.2, rel=0.01)  # the MXFP4 checkpoint's size
    assert _model(oss).fits(1, 32768) and not _model(QWEN_MOE.with_(n_layers=96)).fits(1, 32768)

    def expert_bytes(cfg, draft) -> float:  # noqa: ANN001
        return sum(op.bytes for op in _model(cfg, draft).draft_cost(1, 4096).ops if op.name.startswith("experts"))

    full, int8, int4 = (DraftSpec("self", 512, weight_bits=b) for b in (None, 8, 4))
    assert expert_bytes(QWEN_MOE, int4) / expert_bytes(QWEN_MOE, full) == pytest.approx(0.625 / 2, rel=0.01)
    # MXFP4 experts are smaller than int8 or int4 ones: a quantized draft reads them as they are
    assert expert_bytes(oss, full) == pytest.approx(expert_bytes(oss, int8)) == pytest.approx(expert_bytes(oss, int4))
    assert expert_bytes(oss, full) / expert_bytes(oss.with_(expert_weight_bits=0), full) == pytest.approx(
        4.25 / 16, rel=0.01)


def test_memory_counts_every_expert_and_a_quantized_drafts_copy() -> None:
    llama = resolve_model("llama-3.1-8b")
    for cfg, params in ((llama, llama.num_parameters()), (QWEN_MOE, 30.5e9)):
        quantized = params - cfg.vocab_size * cfg.hidden_size  # all but the embedding (and the norms)
        full = _model(cfg).memory_bytes(1, 4096)
        int4 = _model(cfg, DraftSpec("self", 512, weight_bits=4)).memory_bytes(1, 4096)
        # the copy: every linear weight at 0.625 bytes (the embedding is not one, the untied LM head is)
        assert int4 - full == pytest.approx(quantized * 0.625, rel=0.03), cfg.name
    assert _model(QWEN_MOE).memory_bytes(1, 4096) / 1e9 == pytest.approx(61.1 + 0.4, rel=0.01)  # bf16 + 4K of KV
    oss = resolve_model("gpt-oss-120b")
    added = (_model(oss, DraftSpec("self", 512, weight_bits=4)).memory_bytes(1, 4096)
             - _model(oss).memory_bytes(1, 4096))
    assert added < 0.05 * stored_weight_bytes(oss, 2)  # its MXFP4 experts are read as they are, not copied


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen3-8b"])
def test_a_quantized_drafts_copy_is_what_the_engine_allocates(name: str) -> None:
    from magicdec.model.llama import Transformer
    from magicdec.model.quant import quantized_bytes

    cfg = resolve_model(name)
    added = {bits: _model(cfg, DraftSpec("self", 512, weight_bits=bits)).memory_bytes(1, 4096)
             - _model(cfg).memory_bytes(1, 4096) for bits in (8, 4)}
    model = Transformer(cfg, device="meta")
    assert added[4] == pytest.approx(quantized_bytes(model, 4))
    assert added[8] == pytest.approx(quantized_bytes(model, 8), rel=3e-3)  # the model neglects int8 row scales


def test_critical_context_counts_the_parameters_a_token_computes_with() -> None:
    assert critical_context(QWEN_MOE, H100) == pytest.approx(critical_context(QWEN_DENSE, H100), rel=0.01)


def _run_plan(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = plan.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_plan_runs_for_the_moe_presets(tmp_path) -> None:  # noqa: ANN001
    for name in ("qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b", "mixtral-8x7b"):
        rc, out, _ = _run_plan("--model", name, "--batch", "1", "64", "--context", "32k", "--json")
        rows = json.loads(out)
        assert rc == 0 and len(rows) == 2, name
        k = resolve_model(name).n_experts_per_token
        assert rows[0]["experts_target"] == pytest.approx(k) and rows[1]["experts_verify"] > rows[0]["experts_target"]
    rc, out, _ = _run_plan("--model", "gpt-oss-120b", "--batch", "1", "--png", str(tmp_path / "p.png"))
    assert rc == 0 and "128 experts, top-4, 4.25 bits a weight, uniform routing" in out
    routing = tmp_path / "r.json"
    routing.write_text(json.dumps({"counts": [1] * 8 + [0] * 120}))
    rc, out, _ = _run_plan("--model", "qwen3-30b-a3b", "--batch", "8", "--context", "8k", "--gamma", "3",
                           "--routing", str(routing), "--json")
    assert rc == 0 and json.loads(out)[0]["experts_verify"] == pytest.approx(8)
    rc, _, err = _run_plan("--model", "llama-3.1-8b", "--routing", str(routing))
    assert rc == 2 and "without experts" in err
