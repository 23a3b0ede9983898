/* moe-pack CPU kernel: dense conversions of a file's matrices for the cases a GEMV does not
 * serve. moepack_dequant gives a packed matrix's float32 weights for a prompt's matmul (more
 * tokens than the GEMV takes); moepack_gemv_f16 multiplies an fp16 matrix (a file's lm_head)
 * without widening it in memory. Built into the same library as qgemv_cpu.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __clang__
/* clang contracts a * b + c into an FMA by default; moepack_dequant must round as
 * runtime/dequant.py does (gcc, with -std=c11, does not contract) */
#pragma STDC FP_CONTRACT OFF
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MP_F16C 1
#endif
#include "packed.h"

/* W [N][K] float32 = (code - z) * s, exactly as runtime/dequant.py computes it (s and z from
 * their meta codes in two separately rounded float32 ops, no FMA: see the pragma at the top):
 * the weights a prompt's matmul takes once it has more
 * tokens than the GEMV serves. torch's unpacking spends ~1 s on one Mixtral expert on dev-cpu.
 * desc: matrix_at's 12 numbers. */
int moepack_dequant(const uint8_t *base, const int64_t *desc, float *out, int threads) {
    const mp_mat m = matrix_at(base, desc);
    if (packed_supported(&m) != MP_OK) return MP_UNSUPPORTED;
    const int w = packed_width(m.bits), cu = 32 / w;
    const int64_t N = m.N, K = m.K, U = K / cu, gpr = K / m.group, wpg = m.group / cu;
    const uint32_t mask = (1u << w) - 1u;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : omp_get_max_threads()) reduction(| : failed)
#endif
    {
        float *sw = (float *)malloc(sizeof(float) * (size_t)(2 * U));
        if (sw == NULL) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t n = 0; n < N; n++) {
            if (sw == NULL) continue;
            float *zw = sw + U, *row = out + n * K;
            decode_row_meta(n, gpr, wpg, m.scale, m.smeta, m.zero, m.zmeta, m.mg, m.mb, sw, zw);
            const uint32_t *qn = m.q + n * U;
            const uint16_t *hn = m.bits == 3 ? m.qhi + n * U : NULL;
            for (int64_t j = 0; j < U; j++) {
                const uint32_t word = qn[j], hi = hn != NULL ? hn[j] : 0u;
                const float s = sw[j], z = zw[j];
                for (int i = 0; i < cu; i++) {
                    const uint32_t c = ((word >> (w * i)) & mask) | (((hi >> i) & 1u) << 2);
                    row[j * cu + i] = ((float)c - z) * s;
                }
            }
        }
        free(sw);
    }
    (void)threads;
    return failed ? MP_NOMEM : MP_OK;
}

/* IEEE binary16 bits -> float (portable: the F16C path below converts 8 at a time). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);  /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: normalise */
        int e = -1;
        uint32_t m = man;
        do {
            e++;
            m <<= 1;
        } while (!(m & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* out[t][n] = sum_k W[n][k] x[t][k] for W [N][K] in IEEE fp16 (a file's fp16 tensor, e.g. the
 * lm_head) and x float32: the weights are widened in registers, the arithmetic is float32, so
 * the result is the float32 matmul's up to summation order, from half the bytes. */
int moepack_gemv_f16(const uint16_t *w, const float *x, int64_t N, int64_t K, int64_t T, float *out, int threads) {
    if (N <= 0 || K <= 0 || T <= 0) return MP_UNSUPPORTED;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads > 0 ? threads : omp_get_max_threads())
#endif
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *wn = w + n * K;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * K;
            float acc = 0.0f;
            int64_t k = 0;
#ifdef MP_F16C
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (; k + 16 <= K; k += 16) {
                const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wn + k)));
                const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wn + k + 8)));
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt + k), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + k + 8), a1);
            }
            const __m256 s8 = _mm256_add_ps(a0, a1);
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
            s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            acc = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
#endif
            for (; k < K; k++) acc += half_to_float(wn[k]) * xt[k];
            out[t * N + n] = acc;
        }
    }
    (void)threads;
    return MP_OK;
}
