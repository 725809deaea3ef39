// Concurrency of the C++ API: several std::threads calling the ops on shared,
// read-only weights and Net::forward on one shared Net get the bits a
// sequential call gets, while another thread changes the thread count. Built
// with CONVCORE_SANITIZE=address,undefined this also checks that they touch no
// memory they should not.
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "convcore/convcore.h"
#include "convcore/safetensors.h"
#include "util.h"
#include "../../csrc/cpu/strided.h"

using namespace convcore;
using testutil::Rng;
using testutil::random_tensor;

namespace {

std::string data(const std::string& name) { return std::string(CONVCORE_TEST_DATA_DIR) + "/" + name; }

Tensor conv(const Tensor& x, const Tensor& w, const Tensor& b, ConvAlgorithm algo) {
  Conv2dParams p;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  p.algorithm = algo;
  const Shape4 s = conv2d_output_shape({x.size(0), x.size(1), x.size(2), x.size(3)},
                                       {w.size(0), w.size(1), w.size(2), w.size(3)}, p);
  Tensor y = Tensor::empty(x.dtype(), {s.n, s.c, s.h, s.w});
  const TensorView bv = b.view();
  conv2d_forward(x.view(), w.view(), &bv, p, y.view());
  return y;
}

// Runs fn(i) on `threads` std::threads at once, `reps` times each.
template <typename Fn>
void in_threads(int threads, int reps, Fn fn) {
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int r = 0; r < reps; ++r) fn(t);
    });
  for (auto& th : pool) th.join();
}

}  // namespace

TEST(concurrent_ops_on_shared_weights_match_sequential) {
  Rng rng(5);
  const Tensor x = random_tensor(DType::Float32, {2, 8, 12, 12}, rng);
  const Tensor w = random_tensor(DType::Float32, {16, 8, 3, 3}, rng);
  const Tensor b = random_tensor(DType::Float32, {16}, rng);
  const int before = get_num_threads();
  for (ConvAlgorithm algo : {ConvAlgorithm::Gemm, ConvAlgorithm::Winograd, ConvAlgorithm::Auto}) {
    set_num_threads(2);
    const Tensor expected = conv(x, w, b, algo);
    std::atomic<int> mismatches{0}, calls{0};
    std::atomic<bool> stop{false};
    // one thread keeps changing the thread count while four compute
    std::thread changer([&] {
      for (int i = 0; !stop.load(); ++i) set_num_threads(1 + i % 3);
    });
    in_threads(4, 25, [&](int) {
      mismatches += !testutil::bit_equal(conv(x, w, b, algo), expected);
      ++calls;
    });
    stop = true;
    changer.join();
    CHECK_EQ(calls.load(), 100);
    CHECK_EQ(mismatches.load(), 0);
  }
  set_num_threads(before);
}

TEST(concurrent_net_forward_matches_sequential) {
  for (const char* name : {"mix", "residual", "gap"}) {
    const Net net = Net::load(data(std::string("net_") + name + ".safetensors"));
    const SafetensorsFile io = SafetensorsFile::open(data(std::string("net_") + name + "_io.safetensors"));
    const Tensor x = io.read("input");
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      const Tensor expected = net.forward(x);
      std::atomic<int> mismatches{0}, calls{0};
      in_threads(4, 10, [&](int) {
        mismatches += !testutil::bit_equal(net.forward(x), expected);
        ++calls;
      });
      CHECK_EQ(calls.load(), 40);
      CHECK_EQ(mismatches.load(), 0);
    }
    std::printf("  net_%s: 4 threads x 10 forwards, bit-identical at 1 and 2 core threads\n", name);
  }
}

TEST(concurrent_loads_of_one_file) {
  // Loading is read-only on the file: several threads loading it at once get
  // the same net (the same outputs).
  const std::string path = data("net_residual.safetensors");
  const SafetensorsFile io = SafetensorsFile::open(data("net_residual_io.safetensors"));
  const Tensor x = io.read("input");
  const Tensor expected = Net::load(path).forward(x);
  std::atomic<int> mismatches{0};
  in_threads(4, 5, [&](int) { mismatches += !testutil::bit_equal(Net::load(path).forward(x), expected); });
  CHECK_EQ(mismatches.load(), 0);
}

TEST(threads_override_is_per_caller_thread_and_restored) {
  const int before = convcore::get_num_threads();
  convcore::set_num_threads(2);
  {
    const convcore::detail::ThreadsOverride one(1);
    CHECK(convcore::get_num_threads() == 1);
    int seen_elsewhere = 0;
    std::thread other([&] { seen_elsewhere = convcore::get_num_threads(); });
    other.join();
    CHECK(seen_elsewhere == 2);  // another caller keeps the process-wide count
    {
      const convcore::detail::ThreadsOverride three(3);
      CHECK(convcore::get_num_threads() == 3);
    }
    CHECK(convcore::get_num_threads() == 1);
  }
  CHECK(convcore::get_num_threads() == 2);
  convcore::set_num_threads(before);
}

TEST(stealing_ranges_hand_out_every_task_once) {
  // std::threads stand in for the OpenMP team; thread 0 is slowed, so the
  // others take its last tasks; each thread first takes its own range in order
  for (int team : {1, 2, 3, 4})
    for (int64_t n : {0, 1, 2, 5, 64, 1000}) {
      convcore::detail::StealingRanges ranges(team, n);
      std::vector<std::atomic<int>> seen(static_cast<std::size_t>(n));
      std::vector<std::vector<int64_t>> taken(static_cast<std::size_t>(team));
      std::vector<std::thread> pool;
      for (int me = 0; me < team; ++me)
        pool.emplace_back([&, me] {
          for (int64_t t = ranges.next(me); t >= 0; t = ranges.next(me)) {
            ++seen[static_cast<std::size_t>(t)];
            taken[static_cast<std::size_t>(me)].push_back(t);
            if (me == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
          }
        });
      for (auto& th : pool) th.join();
      for (const auto& s : seen) CHECK_EQ(s.load(), 1);
      for (int me = 0; me < team; ++me) {
        const auto& own = taken[static_cast<std::size_t>(me)];
        const int64_t begin = n * me / team, end = n * (me + 1) / team;
        // a thread's own tasks come first, in order, from the start of its range
        for (std::size_t k = 0; k < own.size() && own[k] >= begin && own[k] < end; ++k)
          CHECK_EQ(own[k], begin + static_cast<int64_t>(k));
      }
    }
}

TEST_MAIN()
