// The compiled module models/native.py builds: the stacked recurrent layers and the stacked MLP.
#include <torch/extension.h>

void bind_recurrent(pybind11::module& m);
void bind_mlp(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_recurrent(m);
  bind_mlp(m);
}
