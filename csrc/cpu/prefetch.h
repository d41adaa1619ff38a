// How far ahead the CPU loops prefetch (cpu_kernel.h, rmsprop_cpu_avx512.cpp).
#pragma once

#include <cstdint>

namespace rmsprop_fused {
namespace cpu {

// How far ahead of the loop each stream is prefetched. The hardware prefetcher stops at every
// 4 KiB page boundary and must retrain, and one core keeps too few misses in flight for its
// three to five streams to hide the memory latency: prefetching 1 KiB ahead took the GPT-2-small
// fp32 step of bench/bench_step.py from 59 to 53 ms (42 to 47 GB/s) on the 2-core Xeon of
// bench/results. 512 B helped less (55 ms); 2 and 4 KiB no more than 1 KiB.
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kCacheLineBytes = 64;

}  // namespace cpu
}  // namespace rmsprop_fused
