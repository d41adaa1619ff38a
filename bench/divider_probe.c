// What bounds the AVX-512 loop of a bf16 plain step on one core (docs/DESIGN.md section 4): the
// loop of csrc/cpu/rmsprop_cpu_avx512.cpp for bfloat16 params and state (interleaved loads,
// vcvtne2ps2bf16 + vpermw stores with the vfpclassps check), over L1-resident data, with its
// square root and its division each kept or replaced by a multiplication, and with the square
// root taken from vrsqrt14ps instead (a cost probe: without the kernel's special cases, so not
// exact); each stream prefetched 1 KiB ahead, as the kernel does. Also the divider's own
// throughput (vsqrtps and vdivps alone) and whether it overlaps with the vector ports.
// Nanoseconds per 32 elements a thread; the threads take a contiguous part each.
//
//   gcc -O2 -march=native -fopenmp bench/divider_probe.c -o /tmp/divider_probe
//   /tmp/divider_probe                 # 4096 elements a stream, one thread: L1-resident
//   /tmp/divider_probe 67108864 2      # GPT-2-sized streams in memory, two threads
//
// Needs AVX-512 F/BW/DQ/BF16 (Sapphire Rapids and later Xeons, Zen 4 and later).
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define INLINE static inline __attribute__((always_inline))

INLINE __m512 root_by_divider(__m512 x) { return _mm512_sqrt_ps(x); }
// vrsqrt14ps, then two Newton corrections with FMAs (what replacing vsqrtps costs the ports)
INLINE __m512 root_by_rsqrt14(__m512 x) {
  const __m512 y = _mm512_rsqrt14_ps(x);
  const __m512 half_y = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
  __m512 s = _mm512_mul_ps(x, y);
  s = _mm512_fmadd_ps(_mm512_fnmadd_ps(s, s, x), half_y, s);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(s, s, x), half_y, s);
}
INLINE __m512 root_dropped(__m512 x) { return _mm512_mul_ps(x, _mm512_set1_ps(0.5f)); }
INLINE __m512 divide_by_divider(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
INLINE __m512 divide_dropped(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }

INLINE __m512 shifted(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
INLINE __m512 masked(__m512i x) {
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)));
}
// vfpclassps for NaN and subnormal lanes, as the kernel checks before vcvtne2ps2bf16
INLINE int needs_codec(__m512 a, __m512 b) {
  return !_kortestz_mask16_u8(_mm512_fpclass_ps_mask(a, 0xa1), _mm512_fpclass_ps_mask(b, 0xa1));
}
INLINE void store_bf16(uint16_t* p, __m512 even, __m512 odd) {
  const __m512i in_order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                            8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(in_order, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
}

// the plain step on 32 elements at a time; EVEN_ROOT and ODD_ROOT for the two vectors of lanes
#define STEP_LOOP(NAME, EVEN_ROOT, ODD_ROOT, DIVIDE)                                            \
  __attribute__((noinline)) static void NAME(uint16_t* p, const uint16_t* g, uint16_t* v,       \
                                             long n) {                                          \
    const __m512 alpha = _mm512_set1_ps(0.99f), one_minus_alpha = _mm512_set1_ps(0.01f);         \
    const __m512 lr = _mm512_set1_ps(0.01f), eps = _mm512_set1_ps(1e-8f);                       \
    for (long i = 0; i < n; i += 32) {                                                          \
      const long ahead = i + 512 < n ? i + 512 : n - 1;                                         \
      __builtin_prefetch(p + ahead);                                                            \
      __builtin_prefetch(g + ahead);                                                            \
      __builtin_prefetch(v + ahead);                                                            \
      const __m512i pp = _mm512_loadu_si512(p + i), gg = _mm512_loadu_si512(g + i),             \
                    vv = _mm512_loadu_si512(v + i);                                             \
      __m512 pe = shifted(pp), po = masked(pp), ge = shifted(gg), go = masked(gg);              \
      __m512 ve = _mm512_add_ps(_mm512_mul_ps(shifted(vv), alpha),                              \
                                _mm512_mul_ps(_mm512_mul_ps(one_minus_alpha, ge), ge));         \
      __m512 vo = _mm512_add_ps(_mm512_mul_ps(masked(vv), alpha),                               \
                                _mm512_mul_ps(_mm512_mul_ps(one_minus_alpha, go), go));         \
      pe = _mm512_sub_ps(pe, DIVIDE(_mm512_mul_ps(lr, ge), _mm512_add_ps(EVEN_ROOT(ve), eps)));  \
      po = _mm512_sub_ps(po, DIVIDE(_mm512_mul_ps(lr, go), _mm512_add_ps(ODD_ROOT(vo), eps)));   \
      if (__builtin_expect(needs_codec(pe, po) || needs_codec(ve, vo), 0)) abort();             \
      store_bf16(p + i, pe, po);                                                                \
      store_bf16(v + i, ve, vo);                                                                \
    }                                                                                           \
  }

STEP_LOOP(as_the_kernel, root_by_divider, root_by_divider, divide_by_divider)
STEP_LOOP(root_dropped_loop, root_dropped, root_dropped, divide_by_divider)
STEP_LOOP(division_dropped_loop, root_by_divider, root_by_divider, divide_dropped)
STEP_LOOP(both_dropped_loop, root_dropped, root_dropped, divide_dropped)
STEP_LOOP(rsqrt14_loop, root_by_rsqrt14, root_by_rsqrt14, divide_by_divider)
STEP_LOOP(half_rsqrt14_loop, root_by_divider, root_by_rsqrt14, divide_by_divider)

typedef void (*StepLoop)(uint16_t*, const uint16_t*, uint16_t*, long);

// ns per iteration of an asm loop body on independent registers (zmm1-8: eight chains of vmulps)
#define MULS8                                                                                   \
  "vmulps %%zmm12,%%zmm1,%%zmm1\n vmulps %%zmm12,%%zmm2,%%zmm2\n vmulps %%zmm12,%%zmm3,%%zmm3\n" \
  "vmulps %%zmm12,%%zmm4,%%zmm4\n vmulps %%zmm12,%%zmm5,%%zmm5\n vmulps %%zmm12,%%zmm6,%%zmm6\n" \
  "vmulps %%zmm12,%%zmm7,%%zmm7\n vmulps %%zmm12,%%zmm8,%%zmm8\n"
#define TIME_ASM(label, body)                                                                   \
  do {                                                                                          \
    static const float ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};             \
    long count = 20000000;                                                                      \
    const double start = now();                                                                 \
    __asm__ volatile(                                                                           \
        "vmovups (%1),%%zmm12\n vmovaps %%zmm12,%%zmm10\n vmovaps %%zmm12,%%zmm11\n"            \
        "vmovaps %%zmm12,%%zmm1\n vmovaps %%zmm12,%%zmm2\n vmovaps %%zmm12,%%zmm3\n"            \
        "vmovaps %%zmm12,%%zmm4\n vmovaps %%zmm12,%%zmm5\n vmovaps %%zmm12,%%zmm6\n"            \
        "vmovaps %%zmm12,%%zmm7\n vmovaps %%zmm12,%%zmm8\n"                                      \
        "1:\n" body "dec %0\n jnz 1b\n"                                                         \
        : "+r"(count)                                                                           \
        : "r"(ones)                                                                             \
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",       \
          "xmm10", "xmm11", "xmm12", "memory");                                                 \
    printf("  %-44s %6.2f ns\n", label, (now() - start) / 20000000 * 1e9);                      \
  } while (0)

int main(int argc, char** argv) {
  const long n = argc > 1 ? atol(argv[1]) : 4096;  // elements a stream; 4096 fit in L1
  const int threads = argc > 2 ? atoi(argv[2]) : 1;
  if (threads <= 0 || n <= 0 || n % (32L * threads) != 0) {
    fprintf(stderr, "the element count must be a positive multiple of 32 times the threads\n");
    return 2;
  }
  const long part = n / threads;
  const long repeats = n < 200000000L / 3 ? 200000000L / n : 3;
  uint16_t* p = aligned_alloc(64, n * 2);
  uint16_t* g = aligned_alloc(64, n * 2);
  uint16_t* v = aligned_alloc(64, n * 2);
  for (long i = 0; i < n; ++i) g[i] = 0x3c00 + (i & 127);  // bf16 in [2^-7, 2^-6)

  printf("the divider and the vector ports, one instruction stream:\n");
  TIME_ASM("vsqrtps zmm alone", "vsqrtps %%zmm10,%%zmm9\n");
  TIME_ASM("vdivps zmm alone", "vdivps %%zmm10,%%zmm11,%%zmm0\n");
  TIME_ASM("vsqrtps + vdivps", "vsqrtps %%zmm10,%%zmm9\n vdivps %%zmm10,%%zmm11,%%zmm0\n");
  TIME_ASM("16 vmulps alone", MULS8 MULS8);
  TIME_ASM("vsqrtps + vdivps + 16 vmulps", "vsqrtps %%zmm10,%%zmm9\n vdivps %%zmm10,%%zmm11,%%zmm0\n" MULS8 MULS8);

  const StepLoop loops[] = {as_the_kernel,  root_dropped_loop, division_dropped_loop,
                            both_dropped_loop, rsqrt14_loop,    half_rsqrt14_loop};
  const char* names[] = {"as the kernel (2 vsqrtps, 2 vdivps)", "vsqrtps -> vmulps",
                         "vdivps -> vmulps", "both -> vmulps (no divider)",
                         "vrsqrt14ps + 2 Newton for every root", "vrsqrt14ps for one root of two"};
  const int kLoops = sizeof(loops) / sizeof(loops[0]);
  double best[sizeof(loops) / sizeof(loops[0])];
  for (int k = 0; k < kLoops; ++k) best[k] = 1e30;
  // rounds that take the loops in turn, the best of each kept (the machine is shared)
  for (int round = 0; round < 5; ++round) {
    for (int k = 0; k < kLoops; ++k) {
      for (long i = 0; i < n; ++i) {
        p[i] = 0x3f80 + (i & 63);   // bf16 in [1, 1.5)
        v[i] = 0x3a00 + (i & 255);  // bf16 in [2^-11, 2^-9)
      }
      const double start = now();
      for (long r = 0; r < repeats; ++r) {
#pragma omp parallel for num_threads(threads)
        for (int t = 0; t < threads; ++t) loops[k](p + t * part, g + t * part, v + t * part, part);
      }
      const double ns = (now() - start) / repeats / part * 32 * 1e9;
      if (ns < best[k]) best[k] = ns;
    }
  }
  printf("the bf16 plain step, %ld elements a stream, %d thread%s, ns per 32 elements a thread (best of 5 rounds):\n",
         n, threads, threads == 1 ? "" : "s");
  for (int k = 0; k < kLoops; ++k) {
    printf("  %-44s %6.2f ns  (%.2fx the kernel's time)\n", names[k], best[k], best[k] / best[0]);
  }
  free(p);
  free(g);
  free(v);
  return 0;
}
