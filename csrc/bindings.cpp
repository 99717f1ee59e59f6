// Operator schemas of the ctssl namespace and the Python module ctssl._C.
//
// The implementations are registered for the CPU and CUDA dispatch keys in each op
// family's .cpp file; importing ctssl._C (after torch) makes them callable as
// torch.ops.ctssl.<name>. The module itself exports nothing else.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ctssl, m) {
  // tables from the patch mask
  m.def("patch_tables(Tensor active, SymInt num_patches) -> (Tensor slot, Tensor patch_ids, Tensor neighbours)");
  // the neighbour table of radius r (N, 2r+1, 2r+1), for windows reaching r patches away
  m.def("neighbour_table(Tensor slot, Tensor patch_ids, int radius) -> Tensor");
  // layout conversion
  m.def("pack_patches(Tensor images, Tensor patch_ids, int grid_h, int grid_w) -> Tensor");
  m.def("densify(Tensor rows, Tensor slot, int patch_side, Tensor? token) -> Tensor");
  // halo gather (the masked conv's input) and its adjoint, on a neighbour table of any radius
  m.def("halo_gather(Tensor rows, Tensor neighbours, int patch_side, int halo) -> Tensor");
  m.def("halo_scatter(Tensor grad_halo, Tensor neighbours, int patch_side, int halo) -> Tensor");
  // masked convolution
  m.def(
      "masked_conv2d(Tensor rows, Tensor neighbours, Tensor weight, Tensor? bias, int patch_side, int stride, "
      "int padding, int dilation, int groups) -> Tensor");
  m.def(
      "masked_conv2d_backward(Tensor grad_out, Tensor rows, Tensor neighbours, Tensor weight, int patch_side, "
      "int stride, int padding, int dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // batch norm over rows, with fused activation (0 none, 1 relu, 2 relu6) and residual
  m.def("bn_stats(Tensor rows) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_apply(Tensor rows, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "int activation) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor grad_y, Tensor? y, Tensor rows, Tensor mean, Tensor invstd, int activation) "
      "-> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "bn_backward_apply(Tensor grad_y, Tensor? y, Tensor rows, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor sum_dz, Tensor sum_dz_xhat, float count, bool batch_stats, int activation, bool need_grad_z) "
      "-> (Tensor grad_rows, Tensor grad_z)");
  // max pooling
  m.def(
      "max_pool2d(Tensor rows, Tensor neighbours, int patch_side, int kernel_size, int stride, int padding) "
      "-> (Tensor out, Tensor argmax)");
  m.def(
      "max_pool2d_backward(Tensor grad_out, Tensor argmax, Tensor neighbours, int patch_side, int kernel_size, "
      "int stride, int padding) -> Tensor");
}

extern "C" {
// A bare module: importing it runs the static registrations above and in the op files.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "ctssl's CUDA/CPU operators, registered as torch.ops.ctssl.*", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
