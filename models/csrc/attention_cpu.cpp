// The first encoder layer's attention of K stacked Transformer forecasters, forward and backward, on a CPU.
//
// A forecaster's tokens are value * embedding + position, rank one in the window's values, so this
// layer's queries, keys and values are value_t * slope + const_t: models/stacked.py passes the slopes
// (K, 3 * width) and the per-position constants (K, T, 3 * width) and they are formed here, in L1, one
// (network, head, window) at a time, instead of three (K, B, T, width) tensors written to memory and
// reduced again in the backward. Heads are small (8) and windows short (32): PyTorch's CPU flash kernel
// tiles for long sequences, so each (window, head) is computed whole here with every inner loop running
// along queries or keys (up to 64: four vectors) and the head's dimensions as the scalars broadcast
// into them; scores are built key by key as rows over the queries, so the softmax over keys is vertical
// vector arithmetic. The backward recomputes the probabilities from the saved log-sum-exp (as flash
// attention does) and adds each window's gradients into its network's slope and constant gradients; a
// work item is one (network, head), so no two threads write one gradient.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "exp_approx.h"

namespace {

using manynets::exp_approx;
using manynets::load;
using manynets::store;
using vec = manynets::lanes16;
constexpr int64_t LANES = 16;
constexpr int64_t MAX_VECTORS = 4;

struct Shape {
  int64_t K, B, T, H, D, W, Tp;  // networks, windows, steps, heads, head width, model width, padded steps
  float scale;
};

Shape checked(const at::Tensor& x, const at::Tensor& slopes, const at::Tensor& consts, int64_t heads) {
  for (const auto* t : {&x, &slopes, &consts})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "rank-one attention: x, slopes and consts must be contiguous float32 CPU tensors");
  TORCH_CHECK(x.dim() == 3 && slopes.dim() == 2 && consts.dim() == 3, "rank-one attention: x must be (K, B, T), "
              "slopes (K, 3 * width), consts (K, T, 3 * width)");
  const int64_t K = x.size(0), B = x.size(1), T = x.size(2), W = slopes.size(1) / 3;
  TORCH_CHECK(heads > 0 && W % heads == 0 && slopes.size(1) == 3 * W && slopes.size(0) == K &&
                  consts.size(0) == K && consts.size(1) == T && consts.size(2) == 3 * W,
              "rank-one attention: shapes do not agree (x ", x.sizes(), ", slopes ", slopes.sizes(), ", consts ",
              consts.sizes(), ", heads ", heads, ")");
  TORCH_CHECK(T >= 1 && T <= MAX_VECTORS * LANES, "rank-one attention: windows of 1 to ", MAX_VECTORS * LANES,
              " steps (got ", T, ")");
  const int64_t D = W / heads;
  return {K, B, T, heads, D, W, (T + LANES - 1) / LANES * LANES, 1.0f / std::sqrt(static_cast<float>(D))};
}

// out[r][:] = scale * sum_d a[d][r] * b[d][:] for r < rows: a and b are (D x Tp), out (rows x Tp).
template <int NV>
void products(int64_t rows, int64_t D, const float* a, const float* b, float scale, float* out) {
  constexpr int64_t Tp = NV * LANES;
  for (int64_t r = 0; r < rows; ++r) {
    vec acc[NV] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float x = a[d * Tp + r] * scale;
      for (int v = 0; v < NV; ++v) acc[v] += x * load(b + d * Tp + v * LANES);
    }
    for (int v = 0; v < NV; ++v) store(out + r * Tp + v * LANES, acc[v]);
  }
}

// out[d][:] = scale * sum_r a[d][r] * b[r][:] for d < D: a is (D x Tp), b (rows x Tp), out (D x Tp).
template <int NV>
void combine(int64_t rows, int64_t D, const float* a, const float* b, float scale, float* out) {
  constexpr int64_t Tp = NV * LANES;
  for (int64_t d = 0; d < D; ++d) {
    vec acc[NV] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float x = a[d * Tp + r];
      for (int v = 0; v < NV; ++v) acc[v] += x * load(b + r * Tp + v * LANES);
    }
    for (int v = 0; v < NV; ++v) store(out + d * Tp + v * LANES, acc[v] * scale);
  }
}

// One (network, head). Its scores are never formed from q and k: with q_i = x_i sq + cq_i and
// k_j = x_j sk + ck_j, scale * q_i . k_j = x_i x_j A + x_i B_j + x_j C_i + D_ij, where A = scale sq . sk,
// B_j = scale sq . ck_j, C_i = scale cq_i . sk and D_ij = scale cq_i . ck_j depend on the network alone:
// they are computed once here, and a window's scores cost 2 multiply-adds each instead of one per head
// dimension. The backward gathers the scores' gradients into A, B, C and D the same way over the
// windows, and turns them into the slopes' and constants' gradients once at the end. Only v is formed.
template <int NV>
struct Head {
  static constexpr int64_t Tp = NV * LANES;
  const Shape& s;
  int64_t n, h;
  std::vector<float> slope, rows;  // slope[part * D + d]; rows[(part * D + d) * Tp + t] (q, k, v constants)
  float A = 0.f;
  alignas(64) float B[Tp] = {}, C[Tp] = {}, x[Tp] = {};  // x: the window being worked on, zero past T
  std::vector<float> D, Dt;                               // D[i * Tp + j], and transposed

  Head(const Shape& s_, const float* slopes, const float* consts, int64_t n_, int64_t h_)
      : s(s_), n(n_), h(h_), slope(3 * s_.D), rows(3 * s_.D * Tp, 0.f), D(Tp * Tp, 0.f), Dt(Tp * Tp, 0.f) {
    for (int64_t part = 0; part < 3; ++part)
      for (int64_t d = 0; d < s.D; ++d) {
        const int64_t column = part * s.W + h * s.D + d;
        slope[part * s.D + d] = slopes[n * 3 * s.W + column];
        for (int64_t t = 0; t < s.T; ++t) rows[(part * s.D + d) * Tp + t] = consts[(n * s.T + t) * 3 * s.W + column];
      }
    const float *sq = &slope[0], *sk = &slope[s.D], *cq = &rows[0], *ck = &rows[s.D * Tp];
    for (int64_t d = 0; d < s.D; ++d) {
      A += s.scale * sq[d] * sk[d];
      for (int64_t t = 0; t < s.T; ++t) B[t] += s.scale * sq[d] * ck[d * Tp + t], C[t] += s.scale * cq[d * Tp + t] * sk[d];
    }
    products<NV>(s.T, s.D, cq, ck, s.scale, D.data());  // D[i][j] = scale sum_d cq[d][i] ck[d][j]
    for (int64_t i = 0; i < s.T; ++i)
      for (int64_t j = 0; j < s.T; ++j) Dt[j * Tp + i] = D[i * Tp + j];
  }

  void read_window(const float* X, int64_t b) {
    for (int64_t t = 0; t < s.T; ++t) x[t] = X[(n * s.B + b) * s.T + t];
  }

  // v of the window read as rows (D x Tp) into `out`.
  void form_values(float* out) const {
    const float* cv = &rows[2 * s.D * Tp];
    for (int64_t d = 0; d < s.D; ++d) {
      const float m = slope[2 * s.D + d];
      for (int v = 0; v < NV; ++v)
        store(out + d * Tp + v * LANES, load(&x[v * LANES]) * m + load(&cv[d * Tp + v * LANES]));
    }
  }

  // element (t, head dimension d) of window b in a (K, B, T, W) tensor
  int64_t at(int64_t b, int64_t t, int64_t d) const { return ((n * s.B + b) * s.T + t) * s.W + h * s.D + d; }

  void gather(const float* X, int64_t b, float* out) const {
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t d = 0; d < s.D; ++d) out[d * Tp + t] = X[at(b, t, d)];
  }

  void scatter(const float* in, int64_t b, float* X) const {
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t d = 0; d < s.D; ++d) X[at(b, t, d)] = in[d * Tp + t];
  }
};

struct Scratch {
  std::vector<float> v, o, go, scores, dp, dv;
  explicit Scratch(const Shape& s)
      : v(s.D * s.Tp), o(s.D * s.Tp, 0.f), go(s.D * s.Tp, 0.f), scores(s.Tp * s.Tp), dp(s.Tp * s.Tp),
        dv(s.D * s.Tp) {}
};

template <int NV>
void forward_heads(const Shape& s, const float* X, const float* slopes, const float* consts, float* O, float* L,
                   int64_t begin, int64_t end) {
  constexpr int64_t Tp = NV * LANES;
  Scratch w(s);
  for (int64_t nh = begin; nh < end; ++nh) {
    Head<NV> head(s, slopes, consts, nh / s.H, nh % s.H);
    for (int64_t b = 0; b < s.B; ++b) {
      head.read_window(X, b);
      head.form_values(w.v.data());
      // Key j's row over the queries: scores_t[j][i] = Dt[j][i] + x_j (x_i A + C_i) + B_j x_i; the softmax
      // runs down the rows.
      vec by_query[NV], xs[NV], m[NV], l[NV];
      for (int v = 0; v < NV; ++v) {
        xs[v] = load(&head.x[v * LANES]);
        by_query[v] = xs[v] * head.A + load(&head.C[v * LANES]);
        l[v] = vec{};
      }
      for (int64_t j = 0; j < s.T; ++j)
        for (int v = 0; v < NV; ++v) {
          const vec x = load(&head.Dt[j * Tp + v * LANES]) + head.x[j] * by_query[v] + head.B[j] * xs[v];
          store(&w.scores[j * Tp + v * LANES], x);
          m[v] = j == 0 ? x : (x > m[v] ? x : m[v]);
        }
      for (int64_t j = 0; j < s.T; ++j)
        for (int v = 0; v < NV; ++v) {
          const vec e = exp_approx(load(&w.scores[j * Tp + v * LANES]) - m[v]);
          store(&w.scores[j * Tp + v * LANES], e);
          l[v] += e;
        }
      combine<NV>(s.T, s.D, w.v.data(), w.scores.data(), 1.0f, w.o.data());
      for (int64_t d = 0; d < s.D; ++d)
        for (int v = 0; v < NV; ++v) store(&w.o[d * Tp + v * LANES], load(&w.o[d * Tp + v * LANES]) / l[v]);
      head.scatter(w.o.data(), b, O);
      float ms[Tp], ls[Tp];
      for (int v = 0; v < NV; ++v) store(ms + v * LANES, m[v]), store(ls + v * LANES, l[v]);
      float* lse = L + ((head.n * s.B + b) * s.H + head.h) * s.T;
      for (int64_t i = 0; i < s.T; ++i) lse[i] = ms[i] + std::log(ls[i]);
    }
  }
}

template <int NV>
void backward_heads(const Shape& s, const float* X, const float* slopes, const float* consts, const float* O,
                    const float* GO, const float* L, float* DS, float* DC, int64_t begin, int64_t end) {
  constexpr int64_t Tp = NV * LANES;
  Scratch w(s);
  // Summed over a (network, head)'s windows: the scores' gradient (dD), weighted by the key's value (E,
  // whose rows sum to dC), and by the query's value (dB); dA per lane; v's constants and slope per lane.
  std::vector<float> dD(Tp * Tp), E(Tp * Tp), dB(Tp), dA(Tp), dcv(s.D * Tp), dsv(s.D * Tp);
  for (int64_t nh = begin; nh < end; ++nh) {
    Head<NV> head(s, slopes, consts, nh / s.H, nh % s.H);
    for (auto* acc : {&dD, &E, &dB, &dA, &dcv, &dsv}) std::fill(acc->begin(), acc->end(), 0.f);
    for (int64_t b = 0; b < s.B; ++b) {
      head.read_window(X, b);
      head.form_values(w.v.data());
      head.gather(O, b, w.o.data());
      head.gather(GO, b, w.go.data());
      const float* lse = L + ((head.n * s.B + b) * s.H + head.h) * s.T;
      float delta[Tp] = {};  // delta_i = dO_i . O_i
      for (int64_t d = 0; d < s.D; ++d)
        for (int64_t i = 0; i < s.T; ++i) delta[i] += w.go[d * Tp + i] * w.o[d * Tp + i];
      vec by_key[NV], xs[NV], weighted[NV];  // by_key = x_j A + B_j; weighted_j = sum_i x_i dS_ij
      for (int v = 0; v < NV; ++v) {
        xs[v] = load(&head.x[v * LANES]);
        by_key[v] = xs[v] * head.A + load(&head.B[v * LANES]);
        weighted[v] = vec{};
      }
      // Queries along rows (i), keys along lanes (j): P, dP = dO_i . v_j and dS = P (dP - delta).
      products<NV>(s.T, s.D, w.go.data(), w.v.data(), 1.0f, w.dp.data());
      for (int64_t i = 0; i < s.T; ++i)
        for (int v = 0; v < NV; ++v) {
          const int64_t at = i * Tp + v * LANES;
          const vec score = load(&head.D[at]) + head.x[i] * by_key[v] + head.C[i] * xs[v];
          const vec p = exp_approx(score - lse[i]);
          // Keys past T (padding) have a probability here but no value: masked by x and never copied out.
          const vec ds = p * (load(&w.dp[at]) - delta[i]);
          store(&w.scores[at], p);
          store(&dD[at], load(&dD[at]) + ds);
          store(&E[at], load(&E[at]) + ds * xs[v]);
          weighted[v] += head.x[i] * ds;
        }
      combine<NV>(s.T, s.D, w.go.data(), w.scores.data(), 1.0f, w.dv.data());  // dV[d][j] = sum_i dO_id P_ij
      for (int v = 0; v < NV; ++v) {
        store(&dB[v * LANES], load(&dB[v * LANES]) + weighted[v]);
        store(&dA[v * LANES], load(&dA[v * LANES]) + weighted[v] * xs[v]);
      }
      for (int64_t d = 0; d < s.D; ++d)
        for (int v = 0; v < NV; ++v) {
          const int64_t at = d * Tp + v * LANES;
          const vec g = load(&w.dv[at]);
          store(&dcv[at], load(&dcv[at]) + g);
          store(&dsv[at], load(&dsv[at]) + g * xs[v]);
        }
    }
    // From A, B, C and D back to the slopes and constants (the scale included): dA sums over keys,
    // dC_i over row i of E; only steps below T count.
    const float *sq = &head.slope[0], *sk = &head.slope[s.D], *cq = &head.rows[0], *ck = &head.rows[s.D * Tp];
    float a = 0.f, dC[Tp] = {};
    for (int64_t t = 0; t < s.T; ++t) a += dA[t];
    for (int64_t i = 0; i < s.T; ++i)
      for (int64_t j = 0; j < s.T; ++j) dC[i] += E[i * Tp + j];
    auto column = [&](int64_t part, int64_t d) { return part * s.W + head.h * s.D + d; };
    for (int64_t d = 0; d < s.D; ++d) {
      float gq = a * sk[d], gk = a * sq[d], gv = 0.f;
      for (int64_t t = 0; t < s.T; ++t) {
        gq += dB[t] * ck[d * Tp + t];
        gk += dC[t] * cq[d * Tp + t];
        gv += dsv[d * Tp + t];
        float dcq = dC[t] * sk[d], dck = dB[t] * sq[d];
        for (int64_t u = 0; u < s.T; ++u) {
          dcq += dD[t * Tp + u] * ck[d * Tp + u];  // query t against every key u
          dck += dD[u * Tp + t] * cq[d * Tp + u];  // key t against every query u
        }
        float* row = DC + (head.n * s.T + t) * 3 * s.W;
        row[column(0, d)] = s.scale * dcq;
        row[column(1, d)] = s.scale * dck;
        row[column(2, d)] = dcv[d * Tp + t];
      }
      DS[head.n * 3 * s.W + column(0, d)] = s.scale * gq;
      DS[head.n * 3 * s.W + column(1, d)] = s.scale * gk;
      DS[head.n * 3 * s.W + column(2, d)] = gv;
    }
  }
}

// Runs f.template operator()<NV>() for this shape's vectors a row.
template <typename F>
void by_width(const Shape& s, const F& f) {
  switch (s.Tp / LANES) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<4>(); break;  // checked() caps T at 4 vectors
  }
}

}  // namespace

// softmax(q k^T / sqrt(D)) v per (network, window, head) with q, k, v = x * slope + const, as (K, B, T, width),
// and the log-sum-exp of each query's scores (K, B, heads, T).
std::vector<at::Tensor> rank_one_attention_forward(at::Tensor x, at::Tensor slopes, at::Tensor consts,
                                                   int64_t heads) {
  const Shape s = checked(x, slopes, consts, heads);
  at::Tensor out = at::empty({s.K, s.B, s.T, s.W}, x.options()), lse = at::empty({s.K, s.B, s.H, s.T}, x.options());
  by_width(s, [&]<int NV>() {
    at::parallel_for(0, s.K * s.H, 1, [&](int64_t begin, int64_t end) {
      forward_heads<NV>(s, x.data_ptr<float>(), slopes.data_ptr<float>(), consts.data_ptr<float>(),
                        out.data_ptr<float>(), lse.data_ptr<float>(), begin, end);
    });
  });
  return {out, lse};
}

// The gradients of the slopes and constants given the output's gradient and what the forward returned.
std::vector<at::Tensor> rank_one_attention_backward(at::Tensor grad_out, at::Tensor x, at::Tensor slopes,
                                                    at::Tensor consts, int64_t heads, at::Tensor out,
                                                    at::Tensor lse) {
  const Shape s = checked(x, slopes, consts, heads);
  grad_out = grad_out.contiguous();
  TORCH_CHECK(grad_out.numel() == s.K * s.B * s.T * s.W && out.numel() == grad_out.numel() && out.is_contiguous() &&
                  lse.is_contiguous() && lse.numel() == s.K * s.B * s.H * s.T,
              "rank-one attention backward: grad_out, out and lse must be what the forward gave");
  at::Tensor dslopes = at::empty_like(slopes), dconsts = at::empty_like(consts);
  by_width(s, [&]<int NV>() {
    at::parallel_for(0, s.K * s.H, 1, [&](int64_t begin, int64_t end) {
      backward_heads<NV>(s, x.data_ptr<float>(), slopes.data_ptr<float>(), consts.data_ptr<float>(),
                         out.data_ptr<float>(), grad_out.data_ptr<float>(), lse.data_ptr<float>(),
                         dslopes.data_ptr<float>(), dconsts.data_ptr<float>(), begin, end);
    });
  });
  return {dslopes, dconsts};
}

void bind_attention(pybind11::module& m) {
  m.def("rank_one_attention_forward", &rank_one_attention_forward);
  m.def("rank_one_attention_backward", &rank_one_attention_backward);
}
