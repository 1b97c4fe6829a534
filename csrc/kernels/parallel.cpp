// The installed host thread pool (see parallel.h for why the kernels use the host's pool).
#include "parallel.h"

namespace fastmoe {
namespace cpu {

namespace {

// Plain function pointers, constant-initialised (zero): valid before any static constructor runs, so
// a host may install its pool from a static initializer of its own.
ThreadPool installed_pool = {nullptr, nullptr};

}  // namespace

void set_thread_pool(ThreadPool pool) {
  if (pool.parallel_for == nullptr || pool.num_threads == nullptr) pool = ThreadPool{nullptr, nullptr};
  installed_pool = pool;
}

void parallel_for(i64 n, i64 grain, const RangeBody& body) {
  if (n <= 0) return;
  if (installed_pool.parallel_for == nullptr) {
    body(0, n);
    return;
  }
  installed_pool.parallel_for(n, grain < 1 ? 1 : grain, body);
}

int max_threads() {
  if (installed_pool.num_threads == nullptr) return 1;
  const int n = installed_pool.num_threads();
  return n < 1 ? 1 : n;
}

}  // namespace cpu
}  // namespace fastmoe
