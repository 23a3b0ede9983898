/* moe-pack CPU kernel: a row's sum off the fast path (row_fast.h), for layouts whose groups or
 * meta blocks do not line up with 8-word vector steps: (scale, zero) come decoded per word
 * (decode_row_meta), and the AVX2 loop hands its tail to the portable one. qgemv_cpu.c includes
 * it after vec.h and XPI. */
#ifndef MP_ROW_GENERAL_H
#define MP_ROW_GENERAL_H

/* Word j's codes (hw: its 3-bit high plane) times x's int16 pairs, x in blocks of xb words. */
static inline int32_t word_dot(uint32_t word, uint32_t hw, int bits, int w, const int32_t *xp, int xb, int64_t j) {
    const int h = 16 / w, tele = bits == 2;
    const uint32_t mask = (1u << w) - 1u;
    int32_t dot = 0;
    for (int p = 0; p < h; p++) {
        /* telescoped (2-bit, p >= 1): the half shifted, its higher codes kept (vec.h, _pair) */
        const uint32_t m = tele && p > 0 ? 0xFFFFu : mask;
        int32_t c0 = (int32_t)(((word & 0xFFFFu) >> (w * p)) & m), c1 = (int32_t)((word >> (16 + w * p)) & m);
        if (bits == 3) {
            c0 |= (int32_t)(((hw >> p) & 1u) << 2);
            c1 |= (int32_t)(((hw >> (h + p)) & 1u) << 2);
        }
        const int32_t pair = xp[XPI(xb, h, p, j)];
        dot += c0 * (int32_t)(int16_t)(pair & 0xFFFF) + c1 * (int32_t)(int16_t)((uint32_t)pair >> 16);
    }
    return dot;
}

/* sum over words [j0, j1) of row n, portable C (the tail of the AVX2 loop, or all of it). */
static float row_scalar(const uint32_t *qn, const uint16_t *hn, int bits, int w, int64_t U, int64_t j0, int64_t j1,
                        const int32_t *xp, const float *d, const float *X, const float *sw, const float *zw) {
    float acc = 0.0f;
    for (int64_t j = j0; j < j1; j++) {
        const int32_t dot = word_dot(qn[j], bits == 3 ? hn[j] : 0u, bits, w, xp, 8, j);
        acc += sw[j] * (d[j] * (float)dot - zw[j] * X[j]);
    }
    return acc;
}

#ifdef MP_AVX2
/* The same sum, 8 words per step. W and BITS are constants at each call site, so the pair
 * loop unrolls and the 3-bit branches fold away. */
static inline __attribute__((always_inline)) float row_avx2(const uint32_t *qn, const uint16_t *hn, const int bits,
                                                            const int w, int64_t U, int64_t j1, const int32_t *xp,
                                                            const float *d, const float *X, const float *sw,
                                                            const float *zw) {
    const int h = 16 / w;
    const uint32_t m = (1u << w) - 1u;
    const __m256i pairmask = _mm256_set1_epi32((int)(m | (m << 16)));
    const __m256i hibit = _mm256_set1_epi32(0x00040004);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= j1; j += 8) {
        const __m256i word = _mm256_loadu_si256((const __m256i *)(qn + j));
        const __m256i hs = bits == 3 ? v8_hi3(hn + j) : _mm256_setzero_si256();
        __m256i dot0 = _mm256_setzero_si256(), dot1 = _mm256_setzero_si256();
        for (int p = 0; p < h; p++) {
            __m256i v = v8_pair(word, pairmask, bits, w, h, p);
            if (bits == 3) v = _mm256_or_si256(v, _mm256_and_si256(_mm256_srli_epi32(hs, p), hibit));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xp + XPI(8, h, p, j)));
            if (p & 1)
                dot1 = MP_DOT(dot1, v, xv);
            else
                dot0 = MP_DOT(dot0, v, xv);
        }
        const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(dot0, dot1));
        const __m256 zx = _mm256_mul_ps(_mm256_loadu_ps(zw + j), _mm256_loadu_ps(X + j));
        const __m256 dd = _mm256_fmsub_ps(f, _mm256_loadu_ps(d + j), zx);
        if (j & 8)
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(sw + j), dd, acc1);
        else
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(sw + j), dd, acc0);
    }
    return v8_hsum(_mm256_add_ps(acc0, acc1)) + row_scalar(qn, hn, bits, w, U, j, j1, xp, d, X, sw, zw);
}
#endif

#endif
