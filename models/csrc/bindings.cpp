// The compiled module models/native.py builds: the stacked recurrent layers, the stacked MLP and the
// stacked Transformer's first attention and its residual norms.
#include <torch/extension.h>

void bind_recurrent(pybind11::module& m);
void bind_mlp(pybind11::module& m);
void bind_attention(pybind11::module& m);
void bind_norm(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_recurrent(m);
  bind_mlp(m);
  bind_attention(m);
  bind_norm(m);
}
