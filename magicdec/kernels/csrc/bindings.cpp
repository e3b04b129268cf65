// Python bindings of the CPU kernels: tensor checks, layout handling, dtypes and the calls into linear.cpp
// and attention.cpp (which hold the arithmetic and include no torch headers, so they compile in a second).
// ATen + torch's pybind casters rather than <torch/extension.h>: a third less compile time.
// Tensors are float32, bfloat16 or float16 (one dtype per call). The kernels read weights, keys and values
// in their own type and compute in float32; the small operands (x, bias, q) are converted to float32 here,
// and the float32 result is rounded to the inputs' dtype, element by element (so invariance is kept).

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>

#include "elements.h"

namespace magicdec_cpu {

// Defined in linear.cpp (see there for the numerics contract).
void linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, Elem wtype, int64_t N,
                int64_t ldw, const float* bias, float* y, int64_t ldy);
void linear_int8_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, int64_t N, int64_t ldw,
                     const float* scale, const float* bias, float* y, int64_t ldy);

// Defined in attention.cpp (see there for the numerics contract).
void attention_f32(const float* q, int64_t qs_b, int64_t qs_h, int64_t qs_t, const void* k, int64_t ks_b,
                   int64_t ks_h, int64_t ks_s, const void* v, int64_t vs_b, int64_t vs_h, int64_t vs_s, Elem kv,
                   const uint8_t* mask, int64_t ms_b, int64_t ms_t, const int32_t* table, int64_t ts_b,
                   int64_t page, float* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D,
                   float* scores, int64_t ss_b, const float* sinks);

namespace {

// Page sizes of paged_attention must be multiples of this: attention.cpp's kBlock (slots per block), so
// that every block of keys lies inside one page.
constexpr int64_t kPageMultiple = 64;

// The kernels' code for a float32, bfloat16 or float16 CPU tensor; fails for anything else.
Elem check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "magicdec cpu kernels: ", name, " must be on the CPU, got ", t.device());
  switch (t.scalar_type()) {
    case at::kFloat: return Elem::f32;
    case at::kBFloat16: return Elem::bf16;
    case at::kHalf: return Elem::f16;
    default: break;
  }
  TORCH_CHECK(false, "magicdec cpu kernels: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* names) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "magicdec cpu kernels: ", names, " must have one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// The tensor itself when its last dimension is contiguous (other strides are passed to the kernel),
// otherwise a contiguous copy.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in) {
  check_cpu(x_in, "x");
  const Elem wtype = check_cpu(w_in, "weight");
  check_same_dtype(x_in, w_in, "x and weight");
  TORCH_CHECK(x_in.dim() == 2, "magicdec cpu linear: x must be [M, K], got ", x_in.sizes());
  TORCH_CHECK(w_in.dim() == 2, "magicdec cpu linear: weight must be [N, K], got ", w_in.sizes());
  TORCH_CHECK(x_in.size(1) == w_in.size(1), "magicdec cpu linear: x is ", x_in.sizes(), " but weight is ",
              w_in.sizes());
  const at::Tensor x = last_dim_contiguous(x_in.to(at::kFloat));
  const at::Tensor w = last_dim_contiguous(w_in);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    check_cpu(*bias_in, "bias");
    check_same_dtype(x_in, *bias_in, "x and bias");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "magicdec cpu linear: bias must be [", N, "], got ",
                bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.to(x_in.scalar_type());
  if (K == 0) return y.zero_().add_(bias.defined() ? bias : at::zeros({N}, x.options())).to(x_in.scalar_type());
  // Tensors of 0 or 1 rows may report any row stride.
  const int64_t ldx = M > 1 ? x.stride(0) : K, ldw = N > 1 ? w.stride(0) : K;
  {
    pybind11::gil_scoped_release no_gil;
    linear_f32(x.data_ptr<float>(), M, K, ldx, w.data_ptr(), wtype, N, ldw,
               bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), N);
  }
  return y.to(x_in.scalar_type());  // no copy for float32
}

// y = (x · weight_qᵀ) * scales + bias: int8 weights [N, K] with one float32 scale per output row; x and bias
// float32, bfloat16 or float16 (converted to float32 here), the result in x's dtype.
at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales_in,
                       const std::optional<at::Tensor>& bias_in) {
  check_cpu(x_in, "x");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar, "magicdec cpu linear_int8: weight_q must be an ",
              "int8 CPU tensor, got ", w.scalar_type(), " on ", w.device());
  TORCH_CHECK(scales_in.device().is_cpu() && scales_in.scalar_type() == at::kFloat, "magicdec cpu linear_int8: ",
              "scales must be a float32 CPU tensor, got ", scales_in.scalar_type(), " on ", scales_in.device());
  TORCH_CHECK(x_in.dim() == 2, "magicdec cpu linear_int8: x must be [M, K], got ", x_in.sizes());
  TORCH_CHECK(w.dim() == 2, "magicdec cpu linear_int8: weight_q must be [N, K], got ", w.sizes());
  TORCH_CHECK(x_in.size(1) == w.size(1), "magicdec cpu linear_int8: x is ", x_in.sizes(), " but weight_q is ",
              w.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  TORCH_CHECK(scales_in.dim() == 1 && scales_in.size(0) == N, "magicdec cpu linear_int8: scales must be [", N,
              "], got ", scales_in.sizes());
  const at::Tensor x = last_dim_contiguous(x_in.to(at::kFloat));
  const at::Tensor wq = last_dim_contiguous(w);
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    check_cpu(*bias_in, "bias");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "magicdec cpu linear_int8: bias must be [", N,
                "], got ", bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.to(x_in.scalar_type());
  if (K == 0) return y.zero_().add_(bias.defined() ? bias : at::zeros({N}, x.options())).to(x_in.scalar_type());
  const int64_t ldx = M > 1 ? x.stride(0) : K, ldw = N > 1 ? wq.stride(0) : K;
  {
    pybind11::gil_scoped_release no_gil;
    linear_int8_f32(x.data_ptr<float>(), M, K, ldx, wq.data_ptr<int8_t>(), N, ldw, scales.data_ptr<float>(),
                    bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), N);
  }
  return y.to(x_in.scalar_type());
}

// attention (table undefined: k, v [B, Hkv, S, D]) or paged_attention (k, v pools [N, Hkv, P, D] and
// table [B, nb] of page ids: S = nb·P). `fn` names the function in messages. scores (paged only; undefined:
// none): float32 [B, nb] with a contiguous last dimension, max-accumulated in place (attention.cpp).
at::Tensor attention_any(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const at::Tensor& allowed_in, const at::Tensor& table_in, const char* fn,
                         const at::Tensor& scores = at::Tensor(), const at::Tensor& sinks_in = at::Tensor()) {
  const bool paged = table_in.defined();
  check_cpu(q_in, "q");
  const Elem kv = check_cpu(k_in, paged ? "k_pool" : "k");
  check_cpu(v_in, paged ? "v_pool" : "v");
  check_same_dtype(q_in, k_in, paged ? "q and k_pool" : "q and k");
  check_same_dtype(q_in, v_in, paged ? "q and v_pool" : "q and v");
  TORCH_CHECK(allowed_in.device().is_cpu() && allowed_in.scalar_type() == at::kBool, "magicdec cpu ", fn,
              ": allowed must be a bool CPU tensor, got ", allowed_in.scalar_type(), " on ", allowed_in.device());
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "magicdec cpu ", fn,
              paged ? ": q must be [B, Hq, T, D] and k_pool, v_pool [N, Hkv, P, D], got "
                    : ": q, k, v must be [B, H, T or S, D], got ",
              q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1);
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "magicdec cpu ", fn, paged ? ": k_pool is " : ": k is ", k_in.sizes(),
              paged ? " but v_pool is " : " but v is ", v_in.sizes());
  TORCH_CHECK((paged || k_in.size(0) == B) && k_in.size(3) == D, "magicdec cpu ", fn, ": q is ", q_in.sizes(),
              paged ? " but k_pool is " : " but k is ", k_in.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "magicdec cpu ", fn, ": ", Hq, " query heads are not a multiple of ", Hkv,
              " KV heads");
  TORCH_CHECK(D % 8 == 0 && D > 0, "magicdec cpu ", fn, ": head dim must be a positive multiple of 8, got ", D);
  at::Tensor table;
  int64_t S = k_in.size(2), page = 0;
  if (paged) {
    const int64_t N = k_in.size(0);
    page = k_in.size(2);
    TORCH_CHECK(page > 0 && page % kPageMultiple == 0, "magicdec cpu ", fn, ": the page size (P = ", page,
                " slots) must be a positive multiple of ", kPageMultiple);
    TORCH_CHECK(table_in.device().is_cpu() && (table_in.scalar_type() == at::kInt ||
                                               table_in.scalar_type() == at::kLong),
                "magicdec cpu ", fn, ": table must be an int32 or int64 CPU tensor, got ", table_in.scalar_type(),
                " on ", table_in.device());
    TORCH_CHECK(table_in.dim() == 2 && table_in.size(0) == B, "magicdec cpu ", fn, ": table must be [", B,
                ", pages per sequence], got ", table_in.sizes());
    const at::Tensor ids = table_in.to(at::kLong).contiguous();  // checked before narrowing to int32
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i)
      TORCH_CHECK(id[i] >= 0 && id[i] < N, "magicdec cpu ", fn, ": table holds page id ", id[i],
                  " but the pools have ", N, " pages");
    table = ids.to(at::kInt);
    S = table.size(1) * page;
  }
  TORCH_CHECK(allowed_in.dim() == 3 && allowed_in.size(0) == B && allowed_in.size(1) == T &&
                  allowed_in.size(2) == S,
              "magicdec cpu ", fn, ": allowed must be [", B, ", ", T, ", ", S, "], got ", allowed_in.sizes());
  if (scores.defined()) {
    TORCH_CHECK(paged, "magicdec cpu ", fn, ": block scores need the paged layout");
    TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2 &&
                    scores.size(0) == B && scores.size(1) == table.size(1) &&
                    (scores.size(1) <= 1 || scores.stride(1) == 1),
                "magicdec cpu ", fn, ": block_scores must be a float32 CPU tensor [", B, ", ", table.size(1),
                "] with a contiguous last dimension, got ", scores.scalar_type(), " ", scores.sizes(), " on ",
                scores.device());
  }
  at::Tensor sinks;  // log2(e) · the per-head logits, float32
  if (sinks_in.defined()) {
    TORCH_CHECK(sinks_in.device().is_cpu() && sinks_in.dim() == 1 && sinks_in.size(0) == Hq, "magicdec cpu ", fn,
                ": sinks must be a CPU tensor [", Hq, "], got ", sinks_in.sizes(), " on ", sinks_in.device());
    sinks = (sinks_in.to(at::kFloat) * 1.4426950408889634).contiguous();
  }
  at::Tensor out = at::empty({B, Hq, T, D}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(q_in.scalar_type());
  TORCH_CHECK(S > 0, "magicdec cpu ", fn, ": no keys to attend to");
  const at::Tensor q = last_dim_contiguous(q_in.to(at::kFloat));
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  const at::Tensor allowed = last_dim_contiguous(allowed_in);
  {
    pybind11::gil_scoped_release no_gil;
    attention_f32(q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), k.stride(0),
                  k.stride(1), k.stride(2), v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), kv,
                  reinterpret_cast<const uint8_t*>(allowed.data_ptr<bool>()), allowed.stride(0), allowed.stride(1),
                  paged ? table.data_ptr<int32_t>() : nullptr, paged ? table.stride(0) : 0, page,
                  out.data_ptr<float>(), B, Hq, Hkv, T, S, D,
                  scores.defined() ? scores.data_ptr<float>() : nullptr, scores.defined() ? scores.stride(0) : 0,
                  sinks.defined() ? sinks.data_ptr<float>() : nullptr);
  }
  return out.to(q_in.scalar_type());  // no copy for float32
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                     const std::optional<at::Tensor>& sinks) {
  return attention_any(q, k, v, allowed, at::Tensor(), "attention", at::Tensor(),
                       sinks.has_value() ? *sinks : at::Tensor());
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& table, const at::Tensor& allowed,
                           const std::optional<at::Tensor>& block_scores, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(table.defined(), "magicdec cpu paged_attention: table is undefined");
  const at::Tensor scores = block_scores.has_value() ? *block_scores : at::Tensor();
  return attention_any(q, k_pool, v_pool, allowed, table, "paged_attention", scores,
                       sinks.has_value() ? *sinks : at::Tensor());
}

}  // namespace
}  // namespace magicdec_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "magicdec batch-invariant CPU kernels (AVX2/FMA/F16C + OpenMP)";
  m.def("cpu_supported", &magicdec_cpu::cpu_supported, "whether this CPU has AVX2, FMA and F16C");
  m.def("linear", &magicdec_cpu::linear,
        "y = x · weightᵀ + bias for x [M, K], weight [N, K] (float32, bfloat16 or float16; float32 arithmetic)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
  m.def("linear_int8", &magicdec_cpu::linear_int8,
        "y = (x · weight_qᵀ) * scales + bias for x [M, K] (float32, bfloat16 or float16), weight_q [N, K] int8, "
        "scales [N] float32 (float32 arithmetic, the result in x's dtype)",
        pybind11::arg("x"), pybind11::arg("weight_q"), pybind11::arg("scales"),
        pybind11::arg("bias") = pybind11::none());
  m.def("attention", &magicdec_cpu::attention,
        "GQA attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] where allowed [B, T, S] (float32, bfloat16 "
        "or float16; float32 arithmetic)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("allowed"),
        pybind11::arg("sinks") = pybind11::none());
  m.def("paged_attention", &magicdec_cpu::paged_attention,
        "attention of q [B, Hq, T, D] over the pages table [B, nb] of the pools k_pool, v_pool [N, Hkv, P, D] "
        "where allowed [B, T, nb·P]: bitwise `attention` on the gathered cache (P a multiple of 64); block_scores "
        "[B, nb] float32 (optional): max-accumulates each page's largest attention probability; sinks [Hq] (optional): "
        "a logit per query head added to each softmax's denominator",
        pybind11::arg("q"), pybind11::arg("k_pool"), pybind11::arg("v_pool"), pybind11::arg("table"),
        pybind11::arg("allowed"), pybind11::arg("block_scores") = pybind11::none(),
        pybind11::arg("sinks") = pybind11::none());
}
