// Operator schemas of the stepwise_ops library. Kernels: ms_deform_attn_cpu.cpp (CPU) and
// ms_deform_attn_cuda.cu (CUDA); fake kernels and autograd are registered from Python
// (stepwise_ops/_library.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import stepwise_ops_C` load the library (the operators register at load time).
PyObject* PyInit_stepwise_ops_C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "stepwise_ops_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stepwise_ops, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("built_with_cuda() -> bool", []() {
#ifdef STEPWISE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
