#include "prefetch.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace rmsprop_fused {
namespace cpu {
namespace {

// The hardware prefetcher stops at every 4 KiB page boundary and must retrain, and one core
// keeps too few misses in flight for its three to nine streams to hide the memory latency:
// prefetching 1 KiB ahead took the GPT-2-small fp32 step of bench/bench_step.py from 59 to 53 ms
// (42 to 47 GB/s) on the 2-core Intel Xeon of bench/results; 512 B helped less, 2 and 4 KiB no
// more than 1 KiB. On the 2-core AMD EPYC (Zen 5) of bench/results no prefetch is 12-18% slower
// in fp32 and 2 KiB is within 3.5% of 1 KiB either way in fp32 and bf16, every option set (bench/
// prefetch_sweep.py, 30 paired rounds). Zen 4's prefetchers need less help: there 512 B took
// 0.91-1.03x the time of 1 KiB in fp32 and 0.88-1.00x in bf16, four sweeps of 12-40 paired rounds
// (docs/DESIGN.md section 4).
int64_t default_prefetch_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) && ebx == 0x68747541 /* "Auth" of AuthenticAMD */ &&
      __get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
    const unsigned base_family = (eax >> 8) & 0xF;
    const unsigned family = base_family + (base_family == 0xF ? (eax >> 20) & 0xFF : 0);
    __builtin_cpu_init();
    // family 0x19 is Zen 3 and Zen 4; only Zen 4 has AVX-512
    if (family == 0x19 && __builtin_cpu_supports("avx512f")) return 512;
  }
#endif
  return 1024;
}

}  // namespace

std::atomic<int64_t> current_prefetch_bytes{default_prefetch_bytes()};

int64_t set_prefetch_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= kMaxPrefetchBytes && bytes % kCacheLineBytes == 0,
              "rmsprop_fused: a prefetch distance must be a multiple of ", kCacheLineBytes,
              " bytes from 0 to ", kMaxPrefetchBytes, ", got ", bytes);
  return current_prefetch_bytes.exchange(bytes, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace rmsprop_fused
