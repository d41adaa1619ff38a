#include "prefetch.h"

#include <c10/util/Exception.h>

namespace rmsprop_fused {
namespace cpu {
namespace {

// The hardware prefetcher stops at every 4 KiB page boundary and must retrain, and one core
// keeps too few misses in flight for its three to nine streams to hide the memory latency:
// prefetching 1 KiB ahead took the GPT-2-small fp32 step of bench/bench_step.py from 59 to 53 ms
// (42 to 47 GB/s) on the 2-core Intel Xeon of bench/results; 512 B helped less, 2 and 4 KiB no
// more than 1 KiB. On the 2-core AMD EPYC (Zen 5) of bench/results no prefetch is 12-18% slower
// in fp32 and 2 KiB is within 3.5% of 1 KiB either way in fp32 and bf16, every option set (bench/
// prefetch_sweep.py, 30 paired rounds): one distance serves both.
constexpr int64_t kDefaultPrefetchBytes = 1024;

}  // namespace

std::atomic<int64_t> current_prefetch_bytes{kDefaultPrefetchBytes};

int64_t set_prefetch_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= kMaxPrefetchBytes && bytes % kCacheLineBytes == 0,
              "rmsprop_fused: a prefetch distance must be a multiple of ", kCacheLineBytes,
              " bytes from 0 to ", kMaxPrefetchBytes, ", got ", bytes);
  return current_prefetch_bytes.exchange(bytes, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace rmsprop_fused
