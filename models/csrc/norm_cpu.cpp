// Residual sum, layer norm and per-network affine of K stacked encoder layers in one pass, on a CPU.
//
// Eager PyTorch runs a post-norm sublayer's end as an add, a layer norm and the affine (the stack's
// weights differ per network, so F.layer_norm cannot take them), and its backward as five more passes
// over the rows; here the forward reads its two inputs once and writes the output and the normalized
// rows, and the backward reads the output's gradient and the normalized rows once, adding the weight
// and bias gradients per network as it goes. Widths that are a multiple of 16 floats up to 128 run on
// whole vectors held in registers (the weight and bias gradients too); others on plain loops.
// Layouts: inputs (K, R, W), weight and bias (K, 1, W), the saved reciprocal standard deviations (K, R).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "lanes16.h"

namespace {

struct Shape {
  int64_t K, R, W;
};

// Sums over a row kept in 16 partial sums, one per lane, so the compiler vectorizes them (one float
// accumulator would be a chain of dependent adds: it may not reorder float additions).
constexpr int64_t LANES = 16;

inline float lane_total(const float (&acc)[LANES]) {
  float total = 0.f;
  for (int64_t l = 0; l < LANES; ++l) total += acc[l];
  return total;
}

using manynets::load;
using manynets::store;
using vec = manynets::lanes16;

template <int NV>
inline float total(const vec (&x)[NV]) {
  vec sum = x[0];
  for (int v = 1; v < NV; ++v) sum += x[v];
  float acc[LANES];
  store(acc, sum);
  return lane_total(acc);
}

// Rows begin..end of the forward, W = 16 NV.
template <int NV>
void forward_rows(const Shape& s, const float* A, const float* B, const float* G, const float* Bi, float eps,
                  float* O, float* N, float* S, int64_t begin, int64_t end) {
  const float inv_w = 1.0f / static_cast<float>(s.W);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * s.W, k = row / s.R;
    vec x[NV], sq[NV];
    for (int v = 0; v < NV; ++v) x[v] = load(A + base + v * LANES) + load(B + base + v * LANES);
    const float mean = total(x) * inv_w;
    for (int v = 0; v < NV; ++v) x[v] -= mean, sq[v] = x[v] * x[v];
    const float r = 1.0f / std::sqrt(total(sq) * inv_w + eps);
    S[row] = r;
    for (int v = 0; v < NV; ++v) {
      const vec n = x[v] * r;
      store(N + base + v * LANES, n);
      store(O + base + v * LANES, n * load(G + k * s.W + v * LANES) + load(Bi + k * s.W + v * LANES));
    }
  }
}

// Network k's backward, W = 16 NV.
template <int NV>
void backward_network(const Shape& s, int64_t k, const float* D, const float* N, const float* S, const float* G,
                      float* X, float* DG, float* DB) {
  const float inv_w = 1.0f / static_cast<float>(s.W);
  vec g[NV], dg[NV] = {}, db[NV] = {};
  for (int v = 0; v < NV; ++v) g[v] = load(G + k * s.W + v * LANES);
  for (int64_t row = k * s.R; row < (k + 1) * s.R; ++row) {
    vec scaled[NV], n[NV], m[NV];
    for (int v = 0; v < NV; ++v) {
      const vec d = load(D + row * s.W + v * LANES);
      n[v] = load(N + row * s.W + v * LANES);
      scaled[v] = d * g[v], m[v] = scaled[v] * n[v];
      dg[v] += d * n[v], db[v] += d;
    }
    const float m1 = total(scaled) * inv_w, m2 = total(m) * inv_w;
    for (int v = 0; v < NV; ++v) store(X + row * s.W + v * LANES, S[row] * (scaled[v] - m1 - n[v] * m2));
  }
  for (int v = 0; v < NV; ++v) store(DG + k * s.W + v * LANES, dg[v]), store(DB + k * s.W + v * LANES, db[v]);
}

// Runs f.template operator()<NV>() where W = 16 NV <= 128; returns false for other widths.
template <typename F>
bool by_vectors(int64_t W, const F& f) {
  switch (W) {
    case 16: f.template operator()<1>(); return true;
    case 32: f.template operator()<2>(); return true;
    case 48: f.template operator()<3>(); return true;
    case 64: f.template operator()<4>(); return true;
    case 96: f.template operator()<6>(); return true;
    case 128: f.template operator()<8>(); return true;
    default: return false;
  }
}

Shape checked(std::initializer_list<const at::Tensor*> rows, const at::Tensor& weight) {
  const at::Tensor& first = **rows.begin();
  for (const auto* t : rows)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                    t->sizes() == first.sizes(),
                "residual norm: inputs must be contiguous float32 CPU tensors of one shape (K, rows, width)");
  const int64_t K = first.size(0), R = first.size(1), W = first.size(2);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == K * W,
              "residual norm: weight and bias must be (K, 1, width) float32");
  return {K, R, W};
}

}  // namespace

// (a + b - mean) * rstd * weight + bias over each row's width; returns the output, the normalized rows and rstd.
std::vector<at::Tensor> residual_norm_forward(at::Tensor a, at::Tensor b, at::Tensor weight, at::Tensor bias,
                                              double eps) {
  a = a.contiguous(), b = b.contiguous(), weight = weight.contiguous(), bias = bias.contiguous();
  const Shape s = checked({&a, &b}, weight);
  TORCH_CHECK(bias.is_contiguous() && bias.numel() == s.K * s.W, "residual norm: bias must be (K, 1, width)");
  at::Tensor out = at::empty_like(a), normed = at::empty_like(a), rstd = at::empty({s.K, s.R}, a.options());
  const float *A = a.data_ptr<float>(), *B = b.data_ptr<float>(), *G = weight.data_ptr<float>(),
              *Bi = bias.data_ptr<float>();
  float *O = out.data_ptr<float>(), *N = normed.data_ptr<float>(), *S = rstd.data_ptr<float>();
  const float inv_w = 1.0f / static_cast<float>(s.W);
  const bool vectors = by_vectors(s.W, [&]<int NV>() {
    at::parallel_for(0, s.K * s.R, 256, [&](int64_t begin, int64_t end) {
      forward_rows<NV>(s, A, B, G, Bi, static_cast<float>(eps), O, N, S, begin, end);
    });
  });
  if (vectors) return {out, normed, rstd};
  at::parallel_for(0, s.K * s.R, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(s.W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * s.W, k = row / s.R;
      float acc[LANES] = {};
      for (int64_t w = 0; w < s.W; ++w) sum[w] = A[base + w] + B[base + w], acc[w % LANES] += sum[w];
      const float mean = lane_total(acc) * inv_w;
      std::fill(acc, acc + LANES, 0.f);
      for (int64_t w = 0; w < s.W; ++w) acc[w % LANES] += (sum[w] - mean) * (sum[w] - mean);
      const float r = 1.0f / std::sqrt(lane_total(acc) * inv_w + static_cast<float>(eps));
      S[row] = r;
      for (int64_t w = 0; w < s.W; ++w) {
        const float n = (sum[w] - mean) * r;
        N[base + w] = n;
        O[base + w] = n * G[k * s.W + w] + Bi[k * s.W + w];
      }
    }
  });
  return {out, normed, rstd};
}

// The gradient of both inputs (one tensor: they are summed), of the weight and of the bias.
std::vector<at::Tensor> residual_norm_backward(at::Tensor grad_out, at::Tensor normed, at::Tensor rstd,
                                               at::Tensor weight) {
  grad_out = grad_out.contiguous(), weight = weight.contiguous();
  const Shape s = checked({&grad_out, &normed}, weight);
  TORCH_CHECK(rstd.is_contiguous() && rstd.numel() == s.K * s.R, "residual norm backward: rstd must be (K, rows)");
  at::Tensor grad_in = at::empty_like(normed), grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  const float *D = grad_out.data_ptr<float>(), *N = normed.data_ptr<float>(), *S = rstd.data_ptr<float>(),
              *G = weight.data_ptr<float>();
  float *X = grad_in.data_ptr<float>(), *DG = grad_weight.data_ptr<float>(), *DB = grad_bias.data_ptr<float>();
  const float inv_w = 1.0f / static_cast<float>(s.W);
  // A work item is one network: its weight and bias gradients are its own to add into.
  const bool vectors = by_vectors(s.W, [&]<int NV>() {
    at::parallel_for(0, s.K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) backward_network<NV>(s, k, D, N, S, G, X, DG, DB);
    });
  });
  if (vectors) return {grad_in, grad_weight, grad_bias};
  at::parallel_for(0, s.K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(s.W), dg(s.W), db(s.W);
    for (int64_t k = begin; k < end; ++k) {
      std::fill(dg.begin(), dg.end(), 0.f);
      std::fill(db.begin(), db.end(), 0.f);
      const float* g = G + k * s.W;
      for (int64_t row = k * s.R; row < (k + 1) * s.R; ++row) {
        const float *d = D + row * s.W, *n = N + row * s.W;
        float acc1[LANES] = {}, acc2[LANES] = {};
        for (int64_t w = 0; w < s.W; ++w) {
          scaled[w] = d[w] * g[w];
          acc1[w % LANES] += scaled[w], acc2[w % LANES] += scaled[w] * n[w];
          dg[w] += d[w] * n[w], db[w] += d[w];
        }
        const float m1 = lane_total(acc1) * inv_w, m2 = lane_total(acc2) * inv_w;
        for (int64_t w = 0; w < s.W; ++w) X[row * s.W + w] = S[row] * (scaled[w] - m1 - n[w] * m2);
      }
      std::copy(dg.begin(), dg.end(), DG + k * s.W);
      std::copy(db.begin(), db.end(), DB + k * s.W);
    }
  });
  return {grad_in, grad_weight, grad_bias};
}

void bind_norm(pybind11::module& m) {
  m.def("residual_norm_forward", &residual_norm_forward);
  m.def("residual_norm_backward", &residual_norm_backward);
}
