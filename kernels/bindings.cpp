// Python bindings of the optional compiled extension `fastrank._cuda` (built by setup.py with FASTRANK_BUILD_CUDA=1).
//
// Every check a caller can fail lives here, with a message that names the argument: the launchers in the .cu files
// assume device, dtype, shape and layout are right. fastrank/ops calls these through the autograd.Function and
// project_gradients wiring of backend="cuda"; they are not meant as a public API of their own.
#include <torch/extension.h>

#include "fastrank_cuda.h"

namespace {

bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// the dtypes the kernel reads in place (pairwise_rank_loss.cu, LabelKind)
bool is_label_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool: case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong:
    case at::kHalf: case at::kBFloat16: case at::kFloat: case at::kDouble: return true;
    default: return false;
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastrank._cuda.", op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fastrank._cuda.", op, ": ", name, " must be contiguous (call .contiguous())");
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "fastrank._cuda.", op, ": ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_rank_loss_forward(
    const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& offsets, double margin,
    double point_weight) {
  const char* op = "pairwise_rank_loss_forward";
  check_cuda(scores, op, "scores");
  check_cuda(labels, op, "labels");
  check_cuda(offsets, op, "group_offsets");
  check_same_device(scores, labels, op, "scores", "labels");
  check_same_device(scores, offsets, op, "scores", "group_offsets");
  TORCH_CHECK(scores.dim() == 1 && labels.dim() == 1 && labels.numel() == scores.numel(), "fastrank._cuda.", op,
              ": scores and labels must be 1-D of equal length, got ", scores.sizes(), " and ", labels.sizes());
  TORCH_CHECK(is_float_dtype(scores.scalar_type()), "fastrank._cuda.", op,
              ": scores must be float32, float16 or bfloat16, got ", scores.scalar_type());
  TORCH_CHECK(is_label_dtype(labels.scalar_type()), "fastrank._cuda.", op,
              ": labels must be bool, (u)int8, int16/32/64 or float16/bfloat16/float32/float64, got ",
              labels.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1 &&
                  (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong),
              "fastrank._cuda.", op, ": group_offsets must be a 1-D int32/int64 tensor of G+1 >= 1 entries, got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  check_contiguous(scores, op, "scores");
  check_contiguous(labels, op, "labels");
  check_contiguous(offsets, op, "group_offsets");
  return fastrank::pairwise_rank_loss_cuda(scores, labels, offsets, margin, point_weight);
}

void check_task_grads(const at::Tensor& grads, const char* op) {
  check_cuda(grads, op, "grads");
  TORCH_CHECK(grads.dim() == 2 && grads.size(0) >= 1 && grads.size(0) <= fastrank::kMaxTasks, "fastrank._cuda.",
              op, ": grads must be (T, P) with 1 <= T <= ", fastrank::kMaxTasks, ", got ", grads.sizes());
  TORCH_CHECK(is_float_dtype(grads.scalar_type()), "fastrank._cuda.", op,
              ": grads must be float32, float16 or bfloat16, got ", grads.scalar_type());
  // rows may be strided (a view into a wider buffer): only the columns must be dense
  TORCH_CHECK(grads.stride(1) == 1 || grads.size(1) <= 1, "fastrank._cuda.", op,
              ": grads must have unit stride along P, got strides ", grads.strides());
}

at::Tensor gram_matrix(const at::Tensor& grads) {
  check_task_grads(grads, "gram_matrix");
  return fastrank::gram_matrix_cuda(grads);
}

at::Tensor combine(const at::Tensor& grads, const at::Tensor& weights) {
  const char* op = "combine";
  check_task_grads(grads, op);
  check_cuda(weights, op, "weights");
  check_same_device(grads, weights, op, "grads", "weights");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 1 && weights.numel() == grads.size(0),
              "fastrank._cuda.", op, ": weights must be a float32 (T,) tensor with T = ", grads.size(0), ", got ",
              weights.scalar_type(), " of shape ", weights.sizes());
  check_contiguous(weights, op, "weights");
  return fastrank::combine_cuda(grads, weights);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrank's native CUDA kernels (optional; fastrank.ops backend='cuda')";
  m.def("pairwise_rank_loss_forward", &pairwise_rank_loss_forward, py::arg("scores"), py::arg("labels"),
        py::arg("group_offsets"), py::arg("margin"), py::arg("point_weight"),
        "(loss fp32 0-d, hits (G,) bool, d loss/d scores) of the fused pairwise + BCE loss, in one pass");
  m.def("gram_matrix", &gram_matrix, py::arg("grads"), "(T, T) fp32 grads @ grads.T in one read of grads");
  m.def("combine", &combine, py::arg("grads"), py::arg("weights"), "(P,) weights @ grads in the dtype of grads");
}
