// C++ tests of the CPU kernels against small sequential references written here, plus the bad-input
// cases (out-of-range ids and indices must read and write nothing). Run by ctest, also under
// AddressSanitizer (cmake -DFASTMOE_ASAN=ON), which turns any out-of-bounds access into a failure.
// Everything runs twice: serially (no host pool) and on a std::thread pool installed here that splits
// every loop into several ranges, and the kernels must give the same bits both ways.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "kernels/cpu_kernels.h"
#include "kernels/parallel.h"
#include "kernels/routing.h"

using namespace fastmoe;

static int failures = 0;
#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond)) {                                                  \
      ++failures;                                                   \
      std::printf("FAIL %s:%d: %s — ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
    }                                                               \
  } while (0)

static std::mt19937 rng(1234);

static float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// ---- a host thread pool ---------------------------------------------------------------------------
// kThreads threads per loop taking ranges of about n / kPieces from a shared counter. It ignores the
// grain on purpose (a pool may split more finely than asked), so that even the small loops here run
// as several ranges on several threads.
struct TestPool {
  static constexpr int kThreads = 3;
  static constexpr i64 kPieces = 7;
  static std::atomic<long> split_loops;  // loops run as more than one range

  static void parallel_for(i64 n, i64 /*grain*/, const cpu::RangeBody& body) {
    const i64 size = std::max<i64>(1, (n + kPieces - 1) / kPieces);
    if (size < n) ++split_loops;
    std::atomic<i64> next{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; ++i) {
      threads.emplace_back([&] {
        for (i64 begin; (begin = next.fetch_add(size)) < n;) body(begin, std::min(n, begin + size));
      });
    }
    for (std::thread& t : threads) t.join();
  }
  static int num_threads() { return kThreads; }
  static constexpr cpu::ThreadPool pool() { return cpu::ThreadPool{&parallel_for, &num_threads}; }
};
std::atomic<long> TestPool::split_loops{0};

static constexpr cpu::ThreadPool kSerial{nullptr, nullptr};

// ---- 16-bit conversions --------------------------------------------------------------------------
static void test_conversions() {
  struct Case {
    float value;
    unsigned short half, bf16;
  } cases[] = {
      {1.0f, 0x3c00, 0x3f80},     {-2.0f, 0xc000, 0xc000},    {65504.f, 0x7bff, 0x4780},
      {0.0f, 0x0000, 0x0000},     {5.9604645e-08f, 0x0001, 0x3380},  // smallest half subnormal
      {1e6f, 0x7c00, 0x4974},     // overflows half
  };
  for (const Case& c : cases) {
    CHECK(from_float<half_t>(c.value).bits == c.half, "half(%g) = 0x%04x, want 0x%04x", c.value,
          from_float<half_t>(c.value).bits, c.half);
    CHECK(from_float<bf16_t>(c.value).bits == c.bf16, "bf16(%g) = 0x%04x, want 0x%04x", c.value,
          from_float<bf16_t>(c.value).bits, c.bf16);
  }
  // Every finite half converts to float and back exactly.
  for (unsigned bits = 0; bits < 0x10000; ++bits) {
    half_t h{static_cast<u16>(bits)};
    const float f = to_float(h);
    if (std::isnan(f)) continue;
    CHECK(from_float<half_t>(f).bits == bits, "half 0x%04x round trip gives 0x%04x", bits, from_float<half_t>(f).bits);
  }
  // Round to nearest even: 1 + 2^-11 is halfway between 1 and the next half, and rounds to 1.
  CHECK(from_float<half_t>(1.0f + 0.00048828125f).bits == 0x3c00, "half rounding tie");
  CHECK(from_float<half_t>(1.0f + 3 * 0.00048828125f).bits == 0x3c02, "half rounding tie up to even");
  CHECK(std::isnan(to_float(from_float<bf16_t>(NAN))), "bf16 NaN stays NaN");
}

// ---- routing --------------------------------------------------------------------------------------
static void test_route_topk() {
  for (int E : {1, 7, 64, 300}) {
    for (int k : {1, 2, 8}) {
      if (k > E) continue;
      for (bool sigmoid : {false, true}) {
        const int T = 33;
        std::vector<float> logits(size_t(T) * E);
        for (float& v : logits) v = uniform(-3, 3);
        std::vector<int> idx(size_t(T) * k);
        std::vector<float> w(size_t(T) * k), probs(size_t(T) * E);
        cpu::route_topk(logits.data(), T, E, k, sigmoid, true, nullptr, 1, 1, 1.5f, idx.data(), w.data(), probs.data());
        for (int t = 0; t < T; ++t) {
          const float* row = logits.data() + size_t(t) * E;
          std::vector<int> order(E);
          for (int e = 0; e < E; ++e) order[e] = e;
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
          double z = 0, sel = 0;
          for (int e = 0; e < E; ++e) z += sigmoid ? 1.0 / (1.0 + std::exp(-row[e])) : std::exp(double(row[e]));
          auto score = [&](int e) { return sigmoid ? 1.0 / (1.0 + std::exp(-row[e])) : std::exp(double(row[e])) / z; };
          for (int j = 0; j < k; ++j) sel += score(order[j]);
          for (int j = 0; j < k; ++j) {
            CHECK(idx[size_t(t) * k + j] == order[j], "E=%d k=%d t=%d j=%d idx %d want %d", E, k, t, j,
                  idx[size_t(t) * k + j], order[j]);
            const double want = 1.5 * score(order[j]) / sel;
            CHECK(std::fabs(w[size_t(t) * k + j] - want) < 1e-5, "weight %g want %g", w[size_t(t) * k + j], want);
          }
        }
      }
    }
  }
}

static void test_route_backward_ignores_bad_ids() {
  const int T = 4, E = 6, k = 2;
  std::vector<float> logits(T * E), grad_w(T * k, 1.f), grad(T * E, 123.f);
  for (float& v : logits) v = uniform(-1, 1);
  std::vector<int> idx = {0, 1, 7, 2, -5, 3, 4, 99};  // out-of-range ids: no access, no contribution
  cpu::route_topk_backward(grad_w.data(), nullptr, logits.data(), idx.data(), T, E, k, false, false, 1.f, grad.data());
  for (float g : grad) CHECK(std::isfinite(g) && g != 123.f, "every gradient written and finite");
}

// ---- plan -----------------------------------------------------------------------------------------
struct PlanRef {
  std::vector<int> counts, offsets, row, assignment;
};

static PlanRef plan_reference(const std::vector<int>& expert, int E, int C, bool by_weight, const std::vector<float>& w,
                              bool pad, long R) {
  const int A = int(expert.size());
  std::vector<std::vector<int>> per(E);
  for (int a = 0; a < A; ++a)
    if (expert[a] >= 0 && expert[a] < E) per[expert[a]].push_back(a);
  PlanRef p;
  p.row.assign(A, -1);
  p.assignment.assign(R, -1);
  p.offsets.push_back(0);
  int next = 0;
  for (int e = 0; e < E; ++e) {
    std::vector<int> kept = per[e];
    if (C >= 0) {
      if (by_weight) std::stable_sort(kept.begin(), kept.end(), [&](int x, int y) { return w[x] > w[y]; });
      if (int(kept.size()) > C) kept.resize(C);
      std::sort(kept.begin(), kept.end());
    }
    const int start = pad ? e * C : next;
    for (size_t i = 0; i < kept.size(); ++i) {
      p.row[kept[i]] = start + int(i);
      p.assignment[start + i] = kept[i];
    }
    p.counts.push_back(int(kept.size()));
    next = start + int(kept.size());
    p.offsets.push_back(pad ? (e + 1) * C : next);
  }
  return p;
}

static void test_make_plan() {
  for (int E : {1, 5, 64}) {
    for (int A : {0, 1, 37, 5000}) {
      for (int mode = 0; mode < 4; ++mode) {  // dropless, position, probs, probs + pad
        std::vector<int> expert(A);
        std::vector<float> w(A);
        for (int a = 0; a < A; ++a) {
          expert[a] = int(std::pow(uniform(0, 1), 3) * E) % E;  // skewed loads, some empty experts
          w[a] = float(int(uniform(0, 8))) / 8;                 // many ties
        }
        const int C = mode == 0 ? -1 : std::max(1, A / (2 * E));
        const bool by_weight = mode >= 2, pad = mode == 3;
        const long R = C < 0 ? A : (pad ? long(E) * C : std::min<long>(A, long(E) * C));
        std::vector<int> counts(E), routed(E), offsets(E + 1), row(A), assignment(R);
        cpu::make_plan(expert.data(), A, E, C, by_weight, w.data(), pad, R, counts.data(), routed.data(),
                       offsets.data(), row.data(), assignment.data());
        const PlanRef ref = plan_reference(expert, E, C, by_weight, w, pad, R);
        CHECK(counts == ref.counts, "counts E=%d A=%d mode=%d", E, A, mode);
        CHECK(offsets == ref.offsets, "offsets E=%d A=%d mode=%d", E, A, mode);
        CHECK(row == ref.row, "rows E=%d A=%d mode=%d", E, A, mode);
        CHECK(assignment == ref.assignment, "assignment E=%d A=%d mode=%d", E, A, mode);
      }
    }
  }
  // Out-of-range ids are dropped; a too-small row count drops rows instead of writing past it.
  std::vector<int> expert = {0, 9, -1, 2, 2, 2};
  std::vector<int> counts(3), routed(3), offsets(4), row(6), assignment(2);
  cpu::make_plan(expert.data(), 6, 3, -1, false, nullptr, false, 2, counts.data(), routed.data(), offsets.data(),
                 row.data(), assignment.data());
  CHECK(row[1] == -1 && row[2] == -1, "bad ids dropped");
  CHECK(row[4] == -1 && row[5] == -1, "rows past num_rows dropped (got %d %d)", row[4], row[5]);
}

// ---- gather / combine / rowdot --------------------------------------------------------------------
static void test_rows() {
  const int T = 9, D = 13, k = 3, R = 20;
  std::vector<float> x(T * D), y(R * D);
  for (float& v : x) v = uniform(-1, 1);
  for (float& v : y) v = uniform(-1, 1);
  std::vector<int> index(R);
  for (int r = 0; r < R; ++r) index[r] = r % 4 == 3 ? -1 : int(uniform(0, T * k));
  index[5] = 10000;  // out of range: zero row, no read
  std::vector<float> scale(T * k);
  for (float& v : scale) v = uniform(0, 1);
  std::vector<float> out(R * D, NAN);
  cpu::gather(x.data(), T, D, index.data(), R, D, k, scale.data(), T * k, out.data());
  for (int r = 0; r < R; ++r) {
    for (int d = 0; d < D; ++d) {
      const bool valid = index[r] >= 0 && index[r] / k < T;
      const float want = valid ? x[(index[r] / k) * D + d] * scale[index[r]] : 0.f;
      CHECK(out[r * D + d] == want, "gather r=%d d=%d", r, d);
    }
  }
  std::vector<int> row(T * k);
  for (int a = 0; a < T * k; ++a) row[a] = a % 5 == 4 ? -1 : int(uniform(0, R));
  row[2] = 777;  // out of range: skipped
  std::vector<float> weight(T * k), combined(T * D, NAN), dots(T * k, NAN);
  for (float& v : weight) v = uniform(0, 1);
  cpu::combine(y.data(), R, D, row.data(), weight.data(), T, k, D, false, combined.data());
  cpu::rowdot(x.data(), y.data(), R, row.data(), T, k, D, dots.data());
  for (int t = 0; t < T; ++t) {
    for (int d = 0; d < D; ++d) {
      float want = 0.f;
      for (int j = 0; j < k; ++j) {
        const int r = row[t * k + j];
        if (r >= 0 && r < R) want += weight[t * k + j] * y[r * D + d];
      }
      CHECK(std::fabs(combined[t * D + d] - want) < 1e-6f, "combine t=%d d=%d", t, d);
    }
    for (int j = 0; j < k; ++j) {
      const int r = row[t * k + j];
      float want = 0.f;
      if (r >= 0 && r < R)
        for (int d = 0; d < D; ++d) want += x[t * D + d] * y[r * D + d];
      CHECK(std::fabs(dots[t * k + j] - want) < 1e-5f, "rowdot t=%d j=%d", t, j);
    }
  }
}

static void test_routing_stats() {
  const int T = 12, E = 5, k = 2, S = 3;
  std::vector<float> probs(T * E);
  for (float& v : probs) v = uniform(0, 1);
  std::vector<int> idx(T * k);
  for (int& v : idx) v = int(uniform(0, E));
  idx[3] = 42;  // out of range: not counted
  std::vector<float> tokens(S * E), mean(S * E);
  cpu::routing_stats(probs.data(), idx.data(), T, E, k, S, tokens.data(), mean.data());
  for (int s = 0; s < S; ++s) {
    for (int e = 0; e < E; ++e) {
      float n = 0, sum = 0;
      for (int t = s * T / S; t < (s + 1) * T / S; ++t) {
        sum += probs[t * E + e];
        for (int j = 0; j < k; ++j) n += idx[t * k + j] == e;
      }
      CHECK(tokens[s * E + e] == n, "tokens s=%d e=%d", s, e);
      CHECK(std::fabs(mean[s * E + e] - sum / (T / S)) < 1e-6f, "mean s=%d e=%d", s, e);
    }
  }
}

// ---- parallel_for and the pool ---------------------------------------------------------------------
static void test_parallel_for() {
  cpu::set_thread_pool(kSerial);
  CHECK(cpu::max_threads() == 1, "no pool: one thread, got %d", cpu::max_threads());
  std::vector<std::pair<i64, i64>> calls;
  cpu::parallel_for(1000, 1, [&](i64 b, i64 e) { calls.emplace_back(b, e); });
  CHECK(calls.size() == 1 && calls[0].first == 0 && calls[0].second == 1000, "no pool: one body(0, n)");
  calls.clear();
  cpu::parallel_for(0, 1, [&](i64 b, i64 e) { calls.emplace_back(b, e); });
  CHECK(calls.empty(), "n = 0: no call");

  cpu::set_thread_pool(TestPool::pool());
  CHECK(cpu::max_threads() == TestPool::kThreads, "pool: %d threads, got %d", TestPool::kThreads, cpu::max_threads());
  for (i64 n : {1, 6, 7, 8, 1000}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    std::atomic<int> ranges{0};
    cpu::parallel_for(n, 1, [&](i64 b, i64 e) {
      ++ranges;
      for (i64 i = b; i < e; ++i) ++hits[size_t(i)];
    });
    bool once = true;
    for (auto& h : hits) once = once && h == 1;
    CHECK(once, "pool: the ranges cover [0, %lld) exactly once", n);
    CHECK(n < 8 || ranges > 1, "pool: n=%lld ran as %d range(s)", n, ranges.load());
  }
  cpu::set_thread_pool(kSerial);
}

// Runs `run` serially and on the pool, returns whether both gave the same bytes in `outputs`.
template <typename Run>
static bool same_on_pool(Run run, const std::vector<std::pair<void*, size_t>>& outputs) {
  std::vector<std::vector<unsigned char>> serial;
  cpu::set_thread_pool(kSerial);
  for (const auto& o : outputs) std::memset(o.first, 0xab, o.second);
  run();
  for (const auto& o : outputs) {
    const auto* bytes = static_cast<const unsigned char*>(o.first);
    serial.emplace_back(bytes, bytes + o.second);
  }
  cpu::set_thread_pool(TestPool::pool());
  for (const auto& o : outputs) std::memset(o.first, 0xcd, o.second);
  run();
  bool same = true;
  for (size_t i = 0; i < outputs.size(); ++i) same = same && std::memcmp(outputs[i].first, serial[i].data(), outputs[i].second) == 0;
  cpu::set_thread_pool(kSerial);
  return same;
}

template <typename V>
static std::pair<void*, size_t> bytes_of(V& v) {
  return {v.data(), v.size() * sizeof(v[0])};
}

// Every kernel on inputs large enough for several plan chunks: the same bits serially and on the pool.
template <typename T>
static void test_parallel_matches_serial() {
  const int T_ = 700, E = 64, k = 6, D = 37, groups = 8, topk_groups = 3;
  std::vector<T> logits(size_t(T_) * E);
  for (T& v : logits) v = from_float<T>(uniform(-4, 4));
  logits[5] = from_float<T>(NAN);  // non-finite keys take their own path
  std::vector<float> bias(E);
  for (float& v : bias) v = uniform(-0.5f, 0.5f);
  for (bool sigmoid : {false, true}) {
    std::vector<int> idx(size_t(T_) * k);
    std::vector<float> w(size_t(T_) * k), probs(size_t(T_) * E);
    CHECK(same_on_pool([&] {
            cpu::route_topk(logits.data(), T_, E, k, sigmoid, true, sigmoid ? bias.data() : nullptr, groups,
                            topk_groups, 2.5f, idx.data(), w.data(), probs.data());
          }, {bytes_of(idx), bytes_of(w), bytes_of(probs)}),
          "route_topk sigmoid=%d", int(sigmoid));
    std::vector<float> grad_w(w.size()), grad_probs(probs.size());
    for (float& v : grad_w) v = uniform(-1, 1);
    for (float& v : grad_probs) v = uniform(-1, 1);
    std::vector<T> grad_logits(logits.size());
    CHECK(same_on_pool([&] {
            cpu::route_topk_backward(grad_w.data(), grad_probs.data(), logits.data(), idx.data(), T_, E, k, sigmoid,
                                     true, 2.5f, grad_logits.data());
          }, {bytes_of(grad_logits)}),
          "route_topk_backward sigmoid=%d", int(sigmoid));
  }

  const int A = 30000;  // several plan chunks on 3 threads
  std::vector<int> expert(A);
  std::vector<float> weight(A);
  for (int a = 0; a < A; ++a) {
    expert[a] = a % 97 == 0 ? -1 : int(std::pow(uniform(0, 1), 2) * E) % E;
    weight[a] = float(int(uniform(0, 16))) / 16;  // ties
  }
  for (int mode = 0; mode < 4; ++mode) {
    const int C = mode == 0 ? -1 : A / (2 * E);
    const bool by_weight = mode >= 2, pad = mode == 3;
    const long R = C < 0 ? A : (pad ? long(E) * C : std::min<long>(A, long(E) * C));
    std::vector<int> counts(E), routed(E), offsets(E + 1), row(A), assignment(R);
    CHECK(same_on_pool([&] {
            cpu::make_plan(expert.data(), A, E, C, by_weight, weight.data(), pad, R, counts.data(), routed.data(),
                           offsets.data(), row.data(), assignment.data());
          }, {bytes_of(counts), bytes_of(routed), bytes_of(offsets), bytes_of(row), bytes_of(assignment)}),
          "make_plan mode=%d", mode);
  }

  const int R = T_ * k;
  std::vector<T> x(size_t(T_) * D), y(size_t(R) * D);
  for (T& v : x) v = from_float<T>(uniform(-1, 1));
  for (T& v : y) v = from_float<T>(uniform(-1, 1));
  std::vector<int> index(R), row(size_t(T_) * k);
  for (int& v : index) v = int(uniform(-2, float(T_ * k)));
  for (int& v : row) v = int(uniform(-2, float(R)));
  std::vector<float> scale(size_t(T_) * k), weights(size_t(T_) * k), dots(size_t(T_) * k);
  for (float& v : scale) v = uniform(0, 2);
  for (float& v : weights) v = uniform(0, 1);
  std::vector<T> gathered(size_t(R) * D), combined(size_t(T_) * D);
  CHECK(same_on_pool([&] {
          cpu::gather(x.data(), T_, D, index.data(), R, D, k, scale.data(), T_ * k, gathered.data());
        }, {bytes_of(gathered)}), "gather");
  for (bool ordered : {false, true}) {
    CHECK(same_on_pool([&] {
            cpu::combine(y.data(), R, D, row.data(), weights.data(), T_, k, D, ordered, combined.data());
          }, {bytes_of(combined)}), "combine ordered=%d", int(ordered));
  }
  CHECK(same_on_pool([&] { cpu::rowdot(x.data(), y.data(), R, row.data(), T_, k, D, dots.data()); }, {bytes_of(dots)}),
        "rowdot");

  const int S = 7;
  std::vector<float> probs(size_t(T_) * E);
  for (float& v : probs) v = uniform(0, 1);
  std::vector<int> idx(size_t(T_) * k);
  for (int& v : idx) v = int(uniform(-1, float(E + 1)));
  std::vector<float> tokens(size_t(S) * E), mean(size_t(S) * E);
  CHECK(same_on_pool([&] {
          cpu::routing_stats(probs.data(), idx.data(), T_, E, k, S, tokens.data(), mean.data());
        }, {bytes_of(tokens), bytes_of(mean)}), "routing_stats");
}

static void run_kernel_tests() {
  test_conversions();
  test_route_topk();
  test_route_backward_ignores_bad_ids();
  test_make_plan();
  test_rows();
  test_routing_stats();
}

int main() {
  test_parallel_for();
  run_kernel_tests();  // serially: no pool installed
  cpu::set_thread_pool(TestPool::pool());
  TestPool::split_loops = 0;
  run_kernel_tests();  // every loop split over the pool's threads
  CHECK(TestPool::split_loops > 0, "the pool ran loops as several ranges");
  cpu::set_thread_pool(kSerial);
  test_parallel_matches_serial<float>();
  test_parallel_matches_serial<half_t>();
  test_parallel_matches_serial<bf16_t>();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all CPU kernel checks passed\n");
  return 0;
}
