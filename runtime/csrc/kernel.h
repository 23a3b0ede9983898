/* moe-pack CPU kernel: what its translation units share (qgemv_cpu.c, the decode rows and
 * everything else; prompt_cpu.c and prompt2_cpu.c, the fast path's rows for 4 and 2 tokens, built
 * apart so that the files compile in parallel): the vector unit's macros, x's layout, the row
 * geometry and x's rounding. */
#ifndef MP_KERNEL_H
#define MP_KERNEL_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MP_AVX2 1
/* acc + the pairwise int16 products of a and b summed per int32 lane: one vpdpwssd where the
 * CPU has VNNI (Intel since Ice Lake, AMD since Zen 4; the H100 host's Xeon has AVX-512), else
 * vpmaddwd then vpaddd. Same sums: codes < 16 times |x| <= 32767 cannot reach vpmaddwd's one
 * wrapping case. The word loop is ~4 instructions per pair of products, so one fewer is ~20%. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MP_DOT(acc, a, b) _mm256_dpwssd_epi32((acc), (a), (b))
#define MP_DOTB(acc, a, b) _mm256_dpbusd_epi32((acc), (a), (b))
#define MP_VNNI 1
#elif defined(__AVXVNNI__)
#define MP_DOT(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
#define MP_DOTB(acc, a, b) _mm256_dpbusd_avx_epi32((acc), (a), (b))
#define MP_VNNI 1
#else
#define MP_DOT(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#define MP_VNNI 0
#endif
#endif
#include "vec.h"
#include "packed.h"

/* x's int16 pairs are stored in blocks of B words (8, or 16 for the wide path): [U/B][H][B], so
 * the B words of one vector step find their H pair vectors at one base pointer and constant
 * offsets. */
#define XPI(b, h, p, j) ((((int64_t)(j) / (b)) * (h) + (p)) * (b) + ((j) % (b)))

/* Tokens per pass of the fast path: each pair of codes is decoded once for this many tokens.
 * A pass of MP_TB tokens (or of 4-bit codes) keeps a word's decoded pairs, one token's two dot
 * chains and nt sums in registers; a pass of 1 or 2 tokens with 2- or 3-bit codes decodes each
 * pair as its products need it (row_fast.h). */
#define MP_TB 4

/* int16 steps of a word's largest |x| with telescoped 2-bit pairs: |x_p - 4 x_(p-1)| <= 5 * 6553
 * fits int16. 2^-13.7 of the largest |x|, still finer than fp16's 2^-11. */
#define TELE_STEPS 6553.0f

typedef struct {
    int w, cu, fast, wl, tele, xb;  /* xb: words per block of x (16: the wide fast path) */
    int a8;  /* int8 activations (mp_act8_on, on a fast_default geometry) */
    int64_t U, Up, gpr, wpg, h;
} mp_geo;

#include "xquant.h"

#endif
