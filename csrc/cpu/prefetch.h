// How far ahead the CPU loops prefetch (cpu_kernel.h, rmsprop_cpu_avx512.cpp): a run-time value,
// so that bench/prefetch_sweep.py can time other distances against it in one process.
#pragma once

#include <atomic>
#include <cstdint>

namespace rmsprop_fused {
namespace cpu {

constexpr int64_t kCacheLineBytes = 64;
// The most a distance may be: far past what any CPU measured wants, a third of a 48 KiB L1.
constexpr int64_t kMaxPrefetchBytes = 16384;

// How far ahead of the loop each stream is prefetched, in bytes of the param stream (prefetch.cpp
// says why it starts at 1 KiB, 512 B on AMD Zen 4, with the measurements). Read inline, so the
// loops call nothing.
extern std::atomic<int64_t> current_prefetch_bytes;
inline int64_t prefetch_bytes() { return current_prefetch_bytes.load(std::memory_order_relaxed); }
// Sets it (a multiple of kCacheLineBytes from 0 to kMaxPrefetchBytes, else an error naming the
// value, and nothing changes) and returns the previous distance. A benchmark aid: a step running
// meanwhile may use either.
int64_t set_prefetch_bytes(int64_t bytes);

// Asks for the cache line of stream[i] in L1, for a read (a hint: it never faults).
template <typename storage_t>
inline __attribute__((always_inline)) void prefetch_line(const storage_t* stream, int64_t i) {
  __builtin_prefetch(stream + i, /*rw=*/0, /*locality=*/3);
}

}  // namespace cpu
}  // namespace rmsprop_fused
