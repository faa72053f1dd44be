// The Python module of the serving engine's native kernels (built by kernels/__init__.py).
#include <torch/extension.h>

void lora_delta(torch::Tensor out, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor parts,
                torch::Tensor segments);
torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m);
torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d);
void dequantize_blocks(torch::Tensor qs, torch::Tensor d, torch::Tensor mins, torch::Tensor out);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor add_rms_norm(torch::Tensor h, torch::Tensor d, torch::Tensor w, double eps);

// The kernels release the GIL: the engine's thread computes while the server's threads go on.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("lora_delta", &lora_delta, release(), "every adapter of a decode step on one projection, in place");
  m.def("q4_1_linear", &q4_1_linear, release(), "x @ W.T with W in Q4_1 blocks (see blocks_cpu.cpp)");
  m.def("q8_0_linear", &q8_0_linear, release(), "x @ W.T with W in Q8_0 blocks");
  m.def("dequantize_blocks", &dequantize_blocks, release(), "Q4_1 or Q8_0 blocks to float32, into out");
  m.def("rms_norm", &rms_norm, release(), "x / sqrt(mean(x^2) + eps) * w (see norm_cpu.cpp)");
  m.def("add_rms_norm", &add_rms_norm, release(), "h += d in place, then rms_norm(h, w, eps)");
}
