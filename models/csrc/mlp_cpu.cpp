// A stack of K MLPs (Linear, ReLU, ..., Linear), forward and backward, on a CPU, one network at a time.
//
// Eager PyTorch runs each layer over all K networks as one batched product and then an elementwise pass
// (ReLU; in the backward its mask and the bias gradient's sum) over a (K, batch, width) tensor: 2 MB for
// 128 networks of 32, which has left the L2 cache before the next pass reads it. Here one network's whole
// stack runs while its activations (batch x width, 16 KB) sit in L1: the bias and ReLU are applied as the
// product's results leave the registers, and the backward's mask and sums read what the last product
// just wrote. The products are a small register-tiled kernel (GCC vector extensions, so -march=native
// picks the width); their widths are padded to a multiple of 16 floats in per-thread scratch. It is
// not blocked for the cache, so it is used up to models/native.py's MLP_MAX_WIDTH. The
// engine's training step (mlp_mse_step) also computes the loss and its gradient there and adds the
// weights' gradients into the stack's gradient matrix, so nothing of a step is kept or revisited.
// Layouts are those of models/stacked.py: weights (K, fan_in, fan_out), biases (K, 1, fan_out), views of
// the stack's (K, P) matrix (rows of a weight contiguous).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "lanes16.h"

namespace {

using manynets::load;
using manynets::store;
using vec = manynets::lanes16;
constexpr int64_t LANES = 16;

inline int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

// C[r, 0:16*NV] = init + sum_p A(r, p) * B[p, 0:16*NV] for r < ROWS, the accumulators in registers.
// A is read one scalar at a time through strides (so A or its transpose), B by rows of ldb; init is a
// bias row or zero; `relu` applies max(x, 0) as it stores, keeping NaN (as torch.relu does).
template <int NV, int ROWS>
inline void tile(int64_t P, const float* A, int64_t sa_r, int64_t sa_p, const float* B, int64_t ldb, float* C,
                 int64_t ldc, const float* bias, bool relu) {
  vec acc[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = bias ? load(bias + v * LANES) : vec{};
  for (int64_t p = 0; p < P; ++p) {
    vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + p * ldb + v * LANES);
    for (int r = 0; r < ROWS; ++r) {
      const float a = A[r * sa_r + p * sa_p];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * LANES, relu ? (acc[r][v] < 0 ? vec{} : acc[r][v]) : acc[r][v]);
}

template <int NV>
void tile_rows(int64_t R, int64_t P, const float* A, int64_t sa_r, int64_t sa_p, const float* B, int64_t ldb,
               float* C, int64_t ldc, const float* bias, bool relu) {
  constexpr int ROWS = NV <= 3 ? 8 : 6;  // at most 24 accumulators, of the 32 vector registers
  int64_t r = 0;
  for (; r + ROWS <= R; r += ROWS) tile<NV, ROWS>(P, A + r * sa_r, sa_r, sa_p, B, ldb, C + r * ldc, ldc, bias, relu);
  for (; r < R; ++r) tile<NV, 1>(P, A + r * sa_r, sa_r, sa_p, B, ldb, C + r * ldc, ldc, bias, relu);
}

// C (R x N) = bias + A (R x P, element (r, p) at A[r * sa_r + p * sa_p]) @ B (P x N); N a multiple of 16.
void product(int64_t R, int64_t N, int64_t P, const float* A, int64_t sa_r, int64_t sa_p, const float* B,
             int64_t ldb, float* C, int64_t ldc, const float* bias, bool relu) {
  for (int64_t c = 0; c < N; c += 4 * LANES) {
    const float* b = bias ? bias + c : nullptr;
    switch (std::min<int64_t>(4, (N - c) / LANES)) {
      case 4: tile_rows<4>(R, P, A, sa_r, sa_p, B + c, ldb, C + c, ldc, b, relu); break;
      case 3: tile_rows<3>(R, P, A, sa_r, sa_p, B + c, ldb, C + c, ldc, b, relu); break;
      case 2: tile_rows<2>(R, P, A, sa_r, sa_p, B + c, ldb, C + c, ldc, b, relu); break;
      default: tile_rows<1>(R, P, A, sa_r, sa_p, B + c, ldb, C + c, ldc, b, relu); break;
    }
  }
}

// One layer's weight and bias for every network: raw pointers and each network's stride.
struct Layer {
  float* weight;
  float* bias;
  int64_t weight_stride, bias_stride, fan_in, fan_out;
};

std::vector<Layer> layers_of(const std::vector<at::Tensor>& params, int64_t K) {
  TORCH_CHECK(!params.empty() && params.size() % 2 == 0, "params: expected weight, bias pairs");
  std::vector<Layer> layers;
  int64_t fan_in = -1;
  for (size_t i = 0; i < params.size(); i += 2) {
    const auto& w = params[i];
    const auto& b = params[i + 1];
    for (const auto* t : {&w, &b})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == K,
                  "MLP parameters must be float32 CPU tensors of shape (K, ., .)");
    TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == w.size(2) && b.size(1) == 1 && b.size(2) == w.size(2) &&
                    b.stride(2) == 1 && (fan_in < 0 || w.size(1) == fan_in),
                "MLP layer ", i / 2, ": shapes or layout do not agree");
    layers.push_back({w.data_ptr<float>(), b.data_ptr<float>(), w.stride(0), b.stride(0), w.size(1), w.size(2)});
    fan_in = w.size(2);
  }
  return layers;
}

at::Tensor checked_input(const at::Tensor& x, const Layer& first) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(2) == first.fan_in,
              "x must be a float32 CPU tensor (K, batch, ", first.fan_in, ")");
  return x.contiguous();
}

// One thread's buffers for running one network at a time: the weights padded to 16 floats (and
// transposed, for the backward), each layer's output, and the gradients flowing down.
struct Scratch {
  std::vector<float> weight, bias, transposed, dweight, grad, below;
  std::vector<std::vector<float>> outputs;
  Scratch(const std::vector<Layer>& layers, int64_t B) {
    int64_t widest = 0, weights = 0;
    for (const auto& layer : layers) {
      widest = std::max({widest, padded(layer.fan_out), padded(layer.fan_in)});
      weights = std::max({weights, layer.fan_in * padded(layer.fan_out), layer.fan_out * padded(layer.fan_in)});
      outputs.emplace_back(B * padded(layer.fan_out));
    }
    weight.resize(weights); transposed.resize(weights); dweight.resize(weights); bias.resize(widest);
    grad.resize(B * widest); below.resize(B * widest);
  }
};

// Network k's forward on its inputs x (B x fan_in): layer l's output (B x its padded width, after the
// ReLU but for the last layer's) goes to out[l].
void forward_one(const std::vector<Layer>& layers, int64_t k, int64_t B, const float* x, Scratch& s,
                 const std::vector<float*>& out) {
  const float* a = x;
  int64_t lda = layers[0].fan_in;
  const int64_t n = layers.size();
  for (int64_t l = 0; l < n; ++l) {
    const Layer& layer = layers[l];
    const int64_t width = padded(layer.fan_out);
    std::fill(s.weight.begin(), s.weight.begin() + layer.fan_in * width, 0.f);
    for (int64_t m = 0; m < layer.fan_in; ++m)
      std::memcpy(&s.weight[m * width], layer.weight + k * layer.weight_stride + m * layer.fan_out, layer.fan_out * 4);
    std::fill(s.bias.begin(), s.bias.begin() + width, 0.f);
    std::memcpy(s.bias.data(), layer.bias + k * layer.bias_stride, layer.fan_out * 4);
    product(B, width, layer.fan_in, a, lda, 1, s.weight.data(), width, out[l], width, s.bias.data(), l + 1 < n);
    a = out[l];
    lda = width;
  }
}

// Network k's backward given s.grad, the loss's gradient with respect to its output (B x the output's
// padded width, zero in the padding): adds each layer's weight and bias gradients into `into`.
// hidden[l] is layer l's kept ReLU output (B x padded width); x the inputs.
void backward_one(const std::vector<Layer>& layers, const std::vector<Layer>& into, int64_t k, int64_t B,
                  const float* x, const std::vector<const float*>& hidden, Scratch& s) {
  int64_t ldg = padded(layers.back().fan_out);
  for (int64_t l = static_cast<int64_t>(layers.size()) - 1; l >= 0; --l) {
    const Layer& layer = layers[l];
    const int64_t fan_in = layer.fan_in, fan_out = layer.fan_out, width = padded(fan_out);
    const int64_t lda = l == 0 ? fan_in : padded(fan_in);
    const float* a = l == 0 ? x : hidden[l - 1];
    // dW = a^T grad: A read transposed through its strides.
    product(fan_in, width, B, a, 1, lda, s.grad.data(), ldg, s.dweight.data(), width, nullptr, false);
    float* dw = into[l].weight + k * into[l].weight_stride;
    for (int64_t m = 0; m < fan_in; ++m)
      for (int64_t j = 0; j < fan_out; ++j) dw[m * fan_out + j] += s.dweight[m * width + j];
    float* db = into[l].bias + k * into[l].bias_stride;
    for (int64_t i = 0; i < B; ++i)
      for (int64_t j = 0; j < fan_out; ++j) db[j] += s.grad[i * ldg + j];
    if (l == 0) break;
    // The gradient below: grad W^T (W^T built padded), then ReLU's mask: zero where its output was
    // <= 0, as threshold_backward.
    const int64_t in_width = padded(fan_in);
    const float* w = layer.weight + k * layer.weight_stride;
    std::fill(s.transposed.begin(), s.transposed.begin() + fan_out * in_width, 0.f);
    for (int64_t m = 0; m < fan_in; ++m)
      for (int64_t j = 0; j < fan_out; ++j) s.transposed[j * in_width + m] = w[m * fan_out + j];
    product(B, in_width, fan_out, s.grad.data(), ldg, 1, s.transposed.data(), in_width, s.below.data(), in_width,
            nullptr, false);
    for (int64_t i = 0; i < B * in_width; ++i) s.below[i] = a[i] <= 0.f ? 0.f : s.below[i];
    std::swap(s.grad, s.below);
    ldg = in_width;
  }
}

// The stack's outputs (K, B, out) for inputs x (K, B, in) and, where `keep`, each hidden layer's ReLU
// output (K, B, its width padded to 16) for mlp_backward.
std::vector<at::Tensor> mlp_forward(at::Tensor x, std::vector<at::Tensor> params, bool keep) {
  const int64_t K = x.size(0), B = x.size(1);
  const auto layers = layers_of(params, K);
  x = checked_input(x, layers[0]);
  const int64_t n = layers.size(), out_width = layers.back().fan_out;
  std::vector<at::Tensor> out{at::empty({K, B, out_width}, x.options())};
  for (int64_t l = 0; keep && l + 1 < n; ++l) out.push_back(at::empty({K, B, padded(layers[l].fan_out)}, x.options()));
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    Scratch s(layers, B);
    std::vector<float*> outputs(n);
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t l = 0; l < n; ++l)
        outputs[l] = keep && l + 1 < n ? out[l + 1].data_ptr<float>() + k * B * padded(layers[l].fan_out)
                                       : s.outputs[l].data();
      forward_one(layers, k, B, x.data_ptr<float>() + k * B * layers[0].fan_in, s, outputs);
      for (int64_t i = 0; i < B; ++i)
        std::memcpy(out[0].data_ptr<float>() + (k * B + i) * out_width, outputs[n - 1] + i * padded(out_width),
                    out_width * 4);
    }
  });
  return out;
}

// The weight and bias gradients [dW0, db0, dW1, ...] given grad_out (K, B, out), the inputs and the hidden
// layers mlp_forward kept. The input's gradient is not computed (it is data).
std::vector<at::Tensor> mlp_backward(at::Tensor grad_out, at::Tensor x, std::vector<at::Tensor> hidden,
                                     std::vector<at::Tensor> params) {
  const int64_t K = x.size(0), B = x.size(1);
  const auto layers = layers_of(params, K);
  x = checked_input(x, layers[0]);
  grad_out = grad_out.contiguous();
  const int64_t n = layers.size(), out_width = layers.back().fan_out;
  TORCH_CHECK(static_cast<int64_t>(hidden.size()) == n - 1, "hidden: expected ", n - 1, " kept layers");
  for (int64_t l = 0; l + 1 < n; ++l)
    TORCH_CHECK(hidden[l].is_contiguous() && hidden[l].numel() == K * B * padded(layers[l].fan_out),
                "hidden: not the layers mlp_forward kept");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({K, B, out_width}), "grad_out: wrong shape");
  std::vector<at::Tensor> grads;
  for (const auto& layer : layers) {
    grads.push_back(at::zeros({K, layer.fan_in, layer.fan_out}, x.options()));
    grads.push_back(at::zeros({K, 1, layer.fan_out}, x.options()));
  }
  const auto targets = layers_of(grads, K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    Scratch s(layers, B);
    std::vector<const float*> kept(n - 1);
    const int64_t ldg = padded(out_width);
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t l = 0; l + 1 < n; ++l) kept[l] = hidden[l].data_ptr<float>() + k * B * padded(layers[l].fan_out);
      std::fill(s.grad.begin(), s.grad.begin() + B * ldg, 0.f);
      for (int64_t i = 0; i < B; ++i)
        std::memcpy(&s.grad[i * ldg], grad_out.data_ptr<float>() + (k * B + i) * out_width, out_width * 4);
      backward_one(layers, targets, k, B, x.data_ptr<float>() + k * B * layers[0].fan_in, kept, s);
    }
  });
  return grads;
}

// One training step of the stack on inputs x (K, B, in) and targets (K, B, out): each network's mean
// squared error over its real rows (`real` (K, B) bool; every row where `full`), returned (K,), with
// its weight and bias gradients added into `into` (laid out as `params`). tasks/fused.py's masked MSE
// and autograd compute the same; nothing is kept, as every layer's output stays in scratch.
at::Tensor mlp_mse_step(at::Tensor x, at::Tensor target, at::Tensor real, bool full, std::vector<at::Tensor> params,
                        std::vector<at::Tensor> into) {
  const int64_t K = x.size(0), B = x.size(1);
  const auto layers = layers_of(params, K);
  x = checked_input(x, layers[0]);
  const int64_t n = layers.size(), out_width = layers.back().fan_out, ldg = padded(out_width);
  target = target.contiguous();
  TORCH_CHECK(target.scalar_type() == at::kFloat && target.sizes() == at::IntArrayRef({K, B, out_width}),
              "target: expected float32 (K, batch, ", out_width, ")");
  if (!full) {
    real = real.to(at::kBool).contiguous();
    TORCH_CHECK(real.sizes() == at::IntArrayRef({K, B}), "real: expected (K, batch)");
  }
  const auto targets = layers_of(into, K);
  for (int64_t l = 0; l < n; ++l)
    TORCH_CHECK(targets[l].fan_in == layers[l].fan_in && targets[l].fan_out == layers[l].fan_out,
                "into: not laid out as params");
  at::Tensor losses = at::empty({K}, x.options());
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    Scratch s(layers, B);
    std::vector<float*> outputs(n);
    std::vector<const float*> kept(n);
    for (int64_t l = 0; l < n; ++l) kept[l] = outputs[l] = s.outputs[l].data();
    for (int64_t k = begin; k < end; ++k) {
      const float* xk = x.data_ptr<float>() + k * B * layers[0].fan_in;
      forward_one(layers, k, B, xk, s, outputs);
      const bool* rows = full ? nullptr : real.data_ptr<bool>() + k * B;
      int64_t count = 0;
      for (int64_t i = 0; i < B; ++i) count += rows ? rows[i] : 1;
      const float scale = 1.0f / static_cast<float>(std::max<int64_t>(count, 1) * out_width);
      const float* t = target.data_ptr<float>() + k * B * out_width;
      std::fill(s.grad.begin(), s.grad.begin() + B * ldg, 0.f);
      double squared = 0.0;
      for (int64_t i = 0; i < B; ++i) {
        if (rows && !rows[i]) continue;  // a padding row: no loss, no gradient
        for (int64_t j = 0; j < out_width; ++j) {
          const float error = outputs[n - 1][i * ldg + j] - t[i * out_width + j];
          squared += error * error;
          s.grad[i * ldg + j] = 2.0f * error * scale;
        }
      }
      losses.data_ptr<float>()[k] = static_cast<float>(squared) * scale;
      backward_one(layers, targets, k, B, xk, kept, s);
    }
  });
  return losses;
}

}  // namespace

void bind_mlp(pybind11::module& m) {
  m.def("mlp_forward", &mlp_forward);
  m.def("mlp_backward", &mlp_backward);
  m.def("mlp_mse_step", &mlp_mse_step);
}
