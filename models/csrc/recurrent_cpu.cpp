// One stacked LSTM or GRU layer of K networks over all time steps, forward and backward, on a CPU.
//
// The eager stacked layer spends most of its time in ~10 small elementwise kernels a step (and ~20 in
// the backward), each a pass over memory. Here each step is one batched product (ATen's, so MKL's)
// and one vectorized pass over the gates, and the backward is written out (BPTT) the same way.
// Layouts are those of models/stacked.py: projected inputs (K, T, B, G) without their bias (adding
// it here saves the pass that broadcasts it), recurrent weights (K, H, G), biases (K, 1, G), hidden
// states (K, T, B, H). Gate orders are PyTorch's: LSTM i, f, g, o (G = 4H); GRU r, z, n (G = 3H), with
// the n gate's recurrent bias inside r.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "exp_approx.h"

namespace {

using manynets::exp_approx;
inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
}

// The row of (network, sample) kb at step t in a (K, T, B, n) tensor.
struct Rows {
  int64_t T, B;
  int64_t at(int64_t kb, int64_t t) const { return ((kb / B) * T + t) * B + kb % B; }
};

// Checks a layer's inputs (float32 CPU tensors, shapes agreeing for `gates` gates) and returns the hidden size.
int64_t checked_hidden(const at::Tensor& projected, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
                       const at::Tensor& bias_hh, int64_t gates, const char* layer) {
  check(projected, "projected", 4); check(weight_hh, "weight_hh", 3);
  check(bias_ih, "bias_ih", 3); check(bias_hh, "bias_hh", 3);
  const int64_t K = projected.size(0), G = projected.size(3), H = G / gates;
  TORCH_CHECK(G == gates * H && weight_hh.size(0) == K && weight_hh.size(1) == H && weight_hh.size(2) == G &&
              bias_ih.numel() == K * G && bias_hh.numel() == K * G, layer, ": shapes do not agree");
  return H;
}

// f(kb) for every (network, sample) row kb of a step, on ATen's threads.
template <typename F>
void for_each_row(int64_t rows, const F& f) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t kb = begin; kb < end; ++kb) f(kb);
  });
}

// The recurrent weights' gradient (K, H, G): every step's contribution in one product, from the hidden
// states (K, T, B, H) and the gradient of the recurrent pre-activations (K, T, B, G).
at::Tensor recurrent_weight_grad(const at::Tensor& hs, const at::Tensor& grad_recurrent) {
  const int64_t K = hs.size(0), T = hs.size(1), B = hs.size(2), H = hs.size(3), G = grad_recurrent.size(3);
  if (T < 2) return at::zeros({K, H, G}, hs.options());
  return at::bmm(hs.narrow(1, 0, T - 1).reshape({K, (T - 1) * B, H}).transpose(1, 2),
                 grad_recurrent.narrow(1, 1, T - 1).reshape({K, (T - 1) * B, G}));
}

// ---- LSTM -----------------------------------------------------------------------------------------

// One row of one step: the gates' projections in (the bias and recurrent part are added here); the
// activated gates written over them, c and h out.
inline void lstm_cell(int64_t H, const float* __restrict bias, const float* __restrict rec,
                      const float* __restrict c_prev, float* __restrict gates, float* __restrict c,
                      float* __restrict h) {
  for (int64_t j = 0; j < 4 * H; ++j) gates[j] += bias[j] + rec[j];
  float* __restrict gi = gates;
  float* __restrict gf = gates + H;
  float* __restrict gg = gates + 2 * H;
  float* __restrict go = gates + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const float i = sigmoid_approx(gi[j]), f = sigmoid_approx(gf[j]);
    const float g = tanh_approx(gg[j]), o = sigmoid_approx(go[j]);
    gi[j] = i; gf[j] = f; gg[j] = g; go[j] = o;
    const float cj = f * c_prev[j] + i * g;
    const float tj = tanh_approx(cj);
    c[j] = cj; h[j] = o * tj;
  }
}

// One row of one step backwards: the gradient of the gates' pre-activations, written over the saved
// gates (read first, never again), and the cell state's gradient carried to the step before (grad_c,
// updated in place). tanh(c) is recomputed rather than saved: as fast, and one buffer fewer.
inline void lstm_cell_backward(int64_t H, float* __restrict gates, const float* __restrict c,
                               const float* __restrict c_prev, const float* __restrict grad_h,
                               const float* __restrict grad_rec, float* __restrict grad_c) {
  float* __restrict di = gates;
  float* __restrict df = gates + H;
  float* __restrict dg = gates + 2 * H;
  float* __restrict dout = gates + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const float i = di[j], f = df[j], g = dg[j], o = dout[j], t = tanh_approx(c[j]);
    const float dh = grad_h[j] + grad_rec[j];
    const float dc = grad_c[j] + dh * o * (1.0f - t * t);
    di[j] = dc * g * i * (1.0f - i);
    df[j] = dc * c_prev[j] * f * (1.0f - f);
    dg[j] = dc * i * (1.0f - g * g);
    dout[j] = dh * t * o * (1.0f - o);
    grad_c[j] = dc * f;
  }
}

std::vector<at::Tensor> lstm_forward(at::Tensor projected, at::Tensor weight_hh, at::Tensor bias_ih,
                                     at::Tensor bias_hh) {
  const int64_t H = checked_hidden(projected, weight_hh, bias_ih, bias_hh, 4, "lstm_forward");
  // The gates are computed over the projections, which nothing reads again (one buffer fewer).
  auto gates = projected.contiguous();
  const int64_t K = gates.size(0), T = gates.size(1), B = gates.size(2), G = gates.size(3);
  const auto bias = (bias_ih + bias_hh).contiguous();
  const auto opts = gates.options();
  auto hs = at::empty({K, T, B, H}, opts);
  auto cs = at::empty({K, T, B, H}, opts);
  auto rec = at::zeros({K, B, G}, opts);
  const auto zero = at::zeros({H}, opts);
  const float *Bi = bias.data_ptr<float>(), *R = rec.data_ptr<float>(), *Z = zero.data_ptr<float>();
  float *A = gates.data_ptr<float>(), *Hs = hs.data_ptr<float>(), *Cs = cs.data_ptr<float>();
  const Rows rows{T, B};
  for (int64_t t = 0; t < T; ++t) {
    if (t > 0) at::bmm_out(rec, hs.select(1, t - 1), weight_hh);
    for_each_row(K * B, [&](int64_t kb) {
      const int64_t row = rows.at(kb, t);
      lstm_cell(H, Bi + (kb / B) * G, R + kb * G, t > 0 ? Cs + (row - B) * H : Z, A + row * G, Cs + row * H,
                Hs + row * H);
    });
  }
  return {hs, gates, cs};
}

std::vector<at::Tensor> lstm_backward(at::Tensor grad_hs, at::Tensor gates, at::Tensor cs, at::Tensor hs,
                                      at::Tensor weight_hh) {
  check(grad_hs, "grad_hs", 4);
  grad_hs = grad_hs.contiguous();
  const int64_t K = gates.size(0), T = gates.size(1), B = gates.size(2), G = gates.size(3), H = G / 4;
  const auto opts = gates.options();
  auto grad_gates = gates;  // each step's gradient overwrites its gates, which nothing reads again
  auto grad_rec = at::zeros({K, B, H}, opts);
  auto grad_c = at::zeros({K, B, H}, opts);
  const auto zero = at::zeros({H}, opts);
  const auto weight_t = weight_hh.transpose(1, 2);
  const float *Gh = grad_hs.data_ptr<float>(), *Cs = cs.data_ptr<float>();
  const float *Dr = grad_rec.data_ptr<float>(), *Z = zero.data_ptr<float>();
  float *D = grad_gates.data_ptr<float>(), *Dc = grad_c.data_ptr<float>();
  const Rows rows{T, B};
  for (int64_t t = T - 1; t >= 0; --t) {
    for_each_row(K * B, [&](int64_t kb) {
      const int64_t row = rows.at(kb, t);
      lstm_cell_backward(H, D + row * G, Cs + row * H, t > 0 ? Cs + (row - B) * H : Z, Gh + row * H,
                         Dr + kb * H, Dc + kb * H);
    });
    if (t > 0) at::bmm_out(grad_rec, grad_gates.select(1, t), weight_t);
  }
  const auto grad_bias = grad_gates.sum({1, 2}).unsqueeze(1);
  return {grad_gates, recurrent_weight_grad(hs, grad_gates), grad_bias, grad_bias};
}

// ---- GRU ------------------------------------------------------------------------------------------

// One row of one step. p: input projections (r, z, n); rec: recurrent projections; each without its bias.
// Saved for the backward: r, z, n and the n gate's recurrent part with its bias (before r scales it).
inline void gru_cell(int64_t H, const float* __restrict p, const float* __restrict bias_ih,
                     const float* __restrict rec, const float* __restrict bias_hh,
                     const float* __restrict h_prev, float* __restrict saved, float* __restrict h) {
  // Read-only inputs are indexed by gate offset; the outputs are what must not alias them.
  for (int64_t j = 0; j < H; ++j) {
    const float r = sigmoid_approx(p[j] + bias_ih[j] + rec[j] + bias_hh[j]);
    const float z = sigmoid_approx(p[H + j] + bias_ih[H + j] + rec[H + j] + bias_hh[H + j]);
    const float recurrent_n = rec[2 * H + j] + bias_hh[2 * H + j];
    const float n = tanh_approx(p[2 * H + j] + bias_ih[2 * H + j] + r * recurrent_n);
    saved[j] = r; saved[H + j] = z; saved[2 * H + j] = n; saved[3 * H + j] = recurrent_n;
    h[j] = n + z * (h_prev[j] - n);
  }
}

// One row of one step backwards. Writes the gradients of the input projections (d) and of the
// recurrent projections (d_rec), and the part of h_prev's gradient that skips the product (carry).
inline void gru_cell_backward(int64_t H, const float* __restrict saved, const float* __restrict h_prev,
                              const float* __restrict grad_h, const float* __restrict grad_rec,
                              const float* __restrict grad_carry, float* __restrict carry_out,
                              float* __restrict d, float* __restrict d_rec) {
  const float* __restrict sr = saved;
  const float* __restrict sz = saved + H;
  const float* __restrict sn = saved + 2 * H;
  const float* __restrict shn = saved + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const float r = sr[j], z = sz[j], n = sn[j], hn = shn[j];
    const float dh = grad_h[j] + grad_rec[j] + grad_carry[j];
    const float dn = dh * (1.0f - z) * (1.0f - n * n);
    const float dz = dh * (h_prev[j] - n) * z * (1.0f - z);
    const float dr = dn * hn * r * (1.0f - r);
    d[j] = dr; d[H + j] = dz; d[2 * H + j] = dn;
    d_rec[j] = dr; d_rec[H + j] = dz; d_rec[2 * H + j] = dn * r;
    carry_out[j] = dh * z;
  }
}

std::vector<at::Tensor> gru_forward(at::Tensor projected, at::Tensor weight_hh, at::Tensor bias_ih,
                                    at::Tensor bias_hh) {
  const int64_t H = checked_hidden(projected, weight_hh, bias_ih, bias_hh, 3, "gru_forward");
  projected = projected.contiguous();
  const auto bias_i = bias_ih.contiguous(), bias_h = bias_hh.contiguous();
  const int64_t K = projected.size(0), T = projected.size(1), B = projected.size(2), G = projected.size(3);
  const auto opts = projected.options();
  auto saved = at::empty({K, T, B, 4 * H}, opts);
  auto hs = at::empty({K, T, B, H}, opts);
  auto rec = at::zeros({K, B, G}, opts);
  const auto zero = at::zeros({H}, opts);
  const float *P = projected.data_ptr<float>(), *R = rec.data_ptr<float>(), *Z = zero.data_ptr<float>();
  const float *Bi = bias_i.data_ptr<float>(), *Bh = bias_h.data_ptr<float>();
  float *S = saved.data_ptr<float>(), *Hs = hs.data_ptr<float>();
  const Rows rows{T, B};
  for (int64_t t = 0; t < T; ++t) {
    if (t > 0) at::bmm_out(rec, hs.select(1, t - 1), weight_hh);
    for_each_row(K * B, [&](int64_t kb) {
      const int64_t row = rows.at(kb, t), k = kb / B;
      gru_cell(H, P + row * G, Bi + k * G, R + kb * G, Bh + k * G, t > 0 ? Hs + (row - B) * H : Z,
               S + row * 4 * H, Hs + row * H);
    });
  }
  return {hs, saved};
}

std::vector<at::Tensor> gru_backward(at::Tensor grad_hs, at::Tensor saved, at::Tensor hs, at::Tensor weight_hh) {
  check(grad_hs, "grad_hs", 4);
  grad_hs = grad_hs.contiguous();
  const int64_t K = hs.size(0), T = hs.size(1), B = hs.size(2), H = hs.size(3), G = 3 * H;
  const auto opts = hs.options();
  auto grad_projected = at::empty({K, T, B, G}, opts);
  auto grad_recurrent = at::empty({K, T, B, G}, opts);
  auto grad_rec = at::zeros({K, B, H}, opts);
  auto carry = at::zeros({K, B, H}, opts);
  auto carry_next = at::empty({K, B, H}, opts);
  const auto zero = at::zeros({H}, opts);
  const auto weight_t = weight_hh.transpose(1, 2);
  const float *Gh = grad_hs.data_ptr<float>(), *S = saved.data_ptr<float>(), *Hs = hs.data_ptr<float>();
  const float *Dr = grad_rec.data_ptr<float>(), *Z = zero.data_ptr<float>();
  float *D = grad_projected.data_ptr<float>(), *Drec = grad_recurrent.data_ptr<float>();
  const Rows rows{T, B};
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* Cin = carry.data_ptr<float>();
    float* Cout = carry_next.data_ptr<float>();
    for_each_row(K * B, [&](int64_t kb) {
      const int64_t row = rows.at(kb, t);
      gru_cell_backward(H, S + row * 4 * H, t > 0 ? Hs + (row - B) * H : Z, Gh + row * H, Dr + kb * H,
                        Cin + kb * H, Cout + kb * H, D + row * G, Drec + row * G);
    });
    std::swap(carry, carry_next);
    if (t > 0) at::bmm_out(grad_rec, grad_recurrent.select(1, t), weight_t);
  }
  return {grad_projected, recurrent_weight_grad(hs, grad_recurrent), grad_projected.sum({1, 2}).unsqueeze(1),
          grad_recurrent.sum({1, 2}).unsqueeze(1)};
}

// exp, sigmoid and tanh of every element of a float32 tensor as the layers compute them, so that tests
// can hold their accuracy to account.
std::vector<at::Tensor> activations(at::Tensor x) {
  check(x, "x", x.dim());
  x = x.contiguous();
  auto e = at::empty_like(x), s = at::empty_like(x), t = at::empty_like(x);
  const float* X = x.data_ptr<float>();
  float *E = e.data_ptr<float>(), *S = s.data_ptr<float>(), *Th = t.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    E[i] = exp_approx(X[i]); S[i] = sigmoid_approx(X[i]); Th[i] = tanh_approx(X[i]);
  }
  return {e, s, t};
}

}  // namespace

void bind_recurrent(pybind11::module& m) {
  m.def("activations", &activations);
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
}
