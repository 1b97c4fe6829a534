// The CPU kernels' one way to run a loop in parallel: on a thread pool the host installs.
//
// Why not OpenMP: a process must have one thread pool. An extension compiled with -fopenmp links
// an OpenMP runtime of its own, which need not be the one torch uses (torch built with Intel
// OpenMP, or a wheel whose libgomp has a hashed soname); its pool of spinning threads then competes
// with torch's for the same cores and ignores torch.set_num_threads — oversubscription that made
// some CPU cases up to 100x slower. So the kernels link no threading runtime at all: the torch
// bindings install torch's own pool (at::parallel_for, at::get_num_threads), so the kernels run on
// the threads torch runs on and respect torch.set_num_threads. Without a host pool (the C++ tests'
// default) every loop runs serially on the calling thread.
//
// This stays torch-free (the kernels build and are tested without torch).
#pragma once

#include <functional>

#include "common.h"

namespace fastmoe {
namespace cpu {

// The body of a parallel loop: handles the indices [begin, end).
using RangeBody = std::function<void(i64 begin, i64 end)>;

// A host thread pool. parallel_for must call the body over disjoint [begin, end) ranges that
// together cover [0, n) (when n > 0), may run them concurrently, and returns when all are done;
// grain is a hint: the smallest range worth a task of its own. num_threads: how many threads it uses.
struct ThreadPool {
  void (*parallel_for)(i64 n, i64 grain, const RangeBody& body);
  int (*num_threads)();
};

// Installs the pool all later kernel calls use (both pointers null: serial again). Meant to be called
// once when the host loads the kernels, before any kernel runs; not synchronised with running kernels.
void set_thread_pool(ThreadPool pool);

// Runs body over disjoint ranges covering [0, n) on the installed pool; without one, a single
// body(0, n) on this thread. Nothing when n <= 0. The kernels give the same bits however the range is
// split: every range writes its own outputs.
void parallel_for(i64 n, i64 grain, const RangeBody& body);

// The installed pool's thread count (1 without one).
int max_threads();

// A grain for loops whose items each cost about `work_per_item` simple operations: enough items that
// a task is worth waking a thread for (torch's at::internal::GRAIN_SIZE is the same 32768).
inline i64 grain_for(i64 work_per_item) {
  const i64 kGrainWork = 32768;
  return work_per_item >= kGrainWork ? 1 : kGrainWork / (work_per_item > 0 ? work_per_item : 1);
}

}  // namespace cpu
}  // namespace fastmoe
