// Torch bindings of the kernels: the fastmoe_C op library (schemas + CPU implementations) and the
// Python module. The kernels themselves (csrc/kernels) know nothing of torch.
//
// Every op writes into outputs its caller allocated (out-variants, declared mutable in the schema),
// so the Python layer controls allocation (and poisons outputs in tests).
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/extension.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include "../kernels/cpu_kernels.h"
#include "../kernels/parallel.h"
#include "checks.h"

namespace fastmoe {
namespace {

// The CPU kernels run on torch's own intra-op thread pool (kernels/parallel.h says why: one pool per
// process, and torch.set_num_threads applies to them too), installed when the library loads, before
// any op can run.
//
// at::parallel_for is an inline template. With torch's native (or TBB) backend its parallel part lives
// in libtorch and works from here. With the OpenMP backend (the usual Linux build) it is a
// `#pragma omp parallel` in the header, compiled here only under -fopenmp: without that flag (this
// extension links no OpenMP runtime, see csrc/build.txt) it would silently run everything on one
// thread. There the loop goes through TensorIterator::for_each instead, exported by libtorch, which
// runs at::parallel_for as compiled inside libtorch, on torch's own OpenMP runtime: a stand-in byte
// tensor numbers the range (element i at anchor + i; never read or written) and each task gets
// the addresses of its [begin, end).
//
// Either way: inline when the range is within the grain, torch has one thread, or the call comes
// from inside one of torch's parallel regions (no nested oversubscription).
#if defined(INTRA_OP_PARALLEL)
void torch_parallel_for(i64 n, i64 grain, const cpu::RangeBody& body) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body(begin, end); });
}
#else
alignas(64) char range_anchor[64];

void torch_parallel_for(i64 n, i64 grain, const cpu::RangeBody& body) {
  if (n <= grain || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    body(0, n);
    return;
  }
  const uintptr_t anchor = reinterpret_cast<uintptr_t>(range_anchor);
  at::Tensor range = at::from_blob(range_anchor, {int64_t(n)}, at::TensorOptions().dtype(at::kByte));
  at::TensorIterator iter = at::TensorIterator::nullary_op(range);
  iter.for_each(
      [&](char** data, const int64_t* /*strides*/, int64_t size) {
        const i64 begin = i64(reinterpret_cast<uintptr_t>(data[0]) - anchor);
        body(begin, begin + size);
      },
      grain);
}
#endif

int torch_num_threads() { return at::get_num_threads(); }

[[maybe_unused]] const bool torch_pool_installed = [] {
  cpu::set_thread_pool(cpu::ThreadPool{&torch_parallel_for, &torch_num_threads});
  return true;
}();

void route_topk_cpu(const at::Tensor& logits, int64_t k, bool sigmoid, bool normalize,
                    const c10::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups, double scaling,
                    at::Tensor& idx, at::Tensor& weight, at::Tensor& probs) {
  check_route_topk(logits, k, bias, num_groups, topk_groups, idx, weight, probs);
  const int64_t T = logits.size(0), E = logits.size(1);
  const float* bias_ptr = bias ? bias->data_ptr<float>() : nullptr;
  float* probs_ptr = probs.numel() ? probs.data_ptr<float>() : nullptr;
  FASTMOE_DISPATCH_FLOAT(logits.scalar_type(), scalar_t, [&] {
    cpu::route_topk(reinterpret_cast<const scalar_t*>(logits.data_ptr()), T, int(E), int(k), sigmoid, normalize,
                    bias_ptr, int(num_groups), int(topk_groups), float(scaling), idx.data_ptr<int>(),
                    weight.data_ptr<float>(), probs_ptr);
  });
}

void route_topk_backward_cpu(const at::Tensor& grad_w, const at::Tensor& grad_probs, const at::Tensor& logits,
                             const at::Tensor& idx, bool sigmoid, bool normalize, double scaling,
                             at::Tensor& grad_logits) {
  check_route_topk_backward(grad_w, grad_probs, logits, idx, grad_logits);
  const int64_t T = logits.size(0), E = logits.size(1), k = idx.size(1);
  const float* gp = grad_probs.numel() ? grad_probs.data_ptr<float>() : nullptr;
  FASTMOE_DISPATCH_FLOAT(logits.scalar_type(), scalar_t, [&] {
    cpu::route_topk_backward(grad_w.data_ptr<float>(), gp, reinterpret_cast<const scalar_t*>(logits.data_ptr()),
                             idx.data_ptr<int>(), T, int(E), int(k), sigmoid, normalize, float(scaling),
                             reinterpret_cast<scalar_t*>(grad_logits.data_ptr()));
  });
}

void make_plan_cpu(const at::Tensor& expert_idx, int64_t num_experts, int64_t capacity, bool drop_by_weight,
                   const c10::optional<at::Tensor>& weight, bool pad, at::Tensor& counts, at::Tensor& routed,
                   at::Tensor& offsets, at::Tensor& row, at::Tensor& assignment) {
  check_make_plan(expert_idx, num_experts, capacity, drop_by_weight, weight, pad, counts, routed, offsets, row,
                  assignment);
  cpu::make_plan(expert_idx.data_ptr<int>(), expert_idx.numel(), int(num_experts), int(capacity),
                 drop_by_weight && capacity >= 0, weight ? weight->data_ptr<float>() : nullptr, pad,
                 assignment.numel(), counts.data_ptr<int>(), routed.data_ptr<int>(), offsets.data_ptr<int>(),
                 row.data_ptr<int>(), assignment.data_ptr<int>());
}

void gather_cpu(const at::Tensor& x, const at::Tensor& index, int64_t div, const c10::optional<at::Tensor>& scale,
                at::Tensor& out) {
  check_gather(x, index, div, scale, out);
  FASTMOE_DISPATCH_FLOAT(x.scalar_type(), scalar_t, [&] {
    cpu::gather(reinterpret_cast<const scalar_t*>(x.data_ptr()), x.size(0), x.stride(0), index.data_ptr<int>(),
                out.size(0), int(out.size(1)), int(div), scale ? scale->data_ptr<float>() : nullptr,
                scale ? scale->numel() : 0, reinterpret_cast<scalar_t*>(out.data_ptr()));
  });
}

void combine_cpu(const at::Tensor& y, const at::Tensor& row, const c10::optional<at::Tensor>& weight, bool ordered,
                 at::Tensor& out) {
  check_combine(y, row, weight, ordered, out);
  FASTMOE_DISPATCH_FLOAT(y.scalar_type(), scalar_t, [&] {
    cpu::combine(reinterpret_cast<const scalar_t*>(y.data_ptr()), y.size(0), y.stride(0), row.data_ptr<int>(),
                 weight ? weight->data_ptr<float>() : nullptr, row.size(0), int(row.size(1)), int(out.size(1)),
                 ordered, reinterpret_cast<scalar_t*>(out.data_ptr()));
  });
}

void rowdot_cpu(const at::Tensor& g, const at::Tensor& y, const at::Tensor& row, at::Tensor& out) {
  check_rowdot(g, y, row, out);
  FASTMOE_DISPATCH_FLOAT(g.scalar_type(), scalar_t, [&] {
    cpu::rowdot(reinterpret_cast<const scalar_t*>(g.data_ptr()), reinterpret_cast<const scalar_t*>(y.data_ptr()),
                y.size(0), row.data_ptr<int>(), row.size(0), int(row.size(1)), int(g.size(1)),
                out.data_ptr<float>());
  });
}

void routing_stats_cpu(const at::Tensor& probs, const at::Tensor& expert_idx, int64_t num_segments,
                       at::Tensor& tokens, at::Tensor& prob_mean) {
  check_routing_stats(probs, expert_idx, num_segments, tokens, prob_mean);
  cpu::routing_stats(probs.data_ptr<float>(), expert_idx.data_ptr<int>(), probs.size(0), int(probs.size(1)),
                     int(expert_idx.size(1)), int(num_segments), tokens.data_ptr<float>(),
                     prob_mean.data_ptr<float>());
}

}  // namespace
}  // namespace fastmoe

TORCH_LIBRARY(fastmoe_C, m) {
  m.def(
      "route_topk(Tensor logits, int k, bool sigmoid, bool normalize, Tensor? bias, int num_groups, int topk_groups, "
      "float scaling, Tensor(a!) idx, Tensor(b!) weight, Tensor(c!) probs) -> ()");
  m.def(
      "route_topk_backward(Tensor grad_w, Tensor grad_probs, Tensor logits, Tensor idx, bool sigmoid, bool normalize, "
      "float scaling, Tensor(a!) grad_logits) -> ()");
  m.def(
      "make_plan(Tensor expert_idx, int num_experts, int capacity, bool drop_by_weight, Tensor? weight, bool pad, "
      "Tensor(a!) counts, Tensor(b!) routed, Tensor(c!) offsets, Tensor(d!) row, Tensor(e!) assignment) -> ()");
  m.def("gather(Tensor x, Tensor index, int div, Tensor? scale, Tensor(a!) out) -> ()");
  m.def("combine(Tensor y, Tensor row, Tensor? weight, bool ordered, Tensor(a!) out) -> ()");
  m.def("rowdot(Tensor g, Tensor y, Tensor row, Tensor(a!) out) -> ()");
  m.def("routing_stats(Tensor probs, Tensor expert_idx, int num_segments, Tensor(a!) tokens, Tensor(b!) prob_mean) -> ()");
}

TORCH_LIBRARY_IMPL(fastmoe_C, CPU, m) {
  m.impl("route_topk", &fastmoe::route_topk_cpu);
  m.impl("route_topk_backward", &fastmoe::route_topk_backward_cpu);
  m.impl("make_plan", &fastmoe::make_plan_cpu);
  m.impl("gather", &fastmoe::gather_cpu);
  m.impl("combine", &fastmoe::combine_cpu);
  m.impl("rowdot", &fastmoe::rowdot_cpu);
  m.impl("routing_stats", &fastmoe::routing_stats_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmoe_kernels compiled kernels: ops registered as torch.ops.fastmoe_C.*";
  // For the tests: how the kernels' parallel_for splits [0, n) here and now, as (ranges, distinct threads,
  // max_threads()); with torch.set_num_threads(2) and n well over grain it must be (2, 2, 2).
  m.def("_parallel_probe", [](int64_t n, int64_t grain) {
    std::mutex mutex;
    int ranges = 0;
    std::set<std::thread::id> threads;
    fastmoe::cpu::parallel_for(n, grain, [&](fastmoe::i64, fastmoe::i64) {
      std::lock_guard<std::mutex> lock(mutex);
      ++ranges;
      threads.insert(std::this_thread::get_id());
    });
    return std::make_tuple(ranges, int(threads.size()), fastmoe::cpu::max_threads());
  });
#if defined(FASTMOE_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
