/* moe-pack CPU kernel: y = W x for one HQQ-quantized matrix straight from its .moepack bytes
 * (docs/FORMAT.md, "Quantized matrices" and "Bit planes"), multi-threaded with OpenMP.
 *
 * Built at first use by runtime/cpu_native.py with the machine's C compiler
 * (-O3 -march=native -fopenmp) and called through ctypes; no Python headers needed.
 *
 * Why integers: the float kernel (runtime/cpu_expert.py, numba) spends one int->float
 * conversion and one FMA per weight and lane, and the conversion port is its bottleneck.
 * Here x is quantized per 32-bit word of codes to int16 with its own scale d
 * (x ~= d * x16, |x16| <= 32767: 2^-16 of the word's largest |x|, finer than fp16's 2^-11),
 * and a word's codes meet x16 through vpmaddwd, which multiplies 16 int16 pairs and adds
 * neighbours: 2 codes per instruction and lane, no conversion until the end of a word.
 *
 * For row n, word j (CU codes c, same group: scale s, zero z):
 *     sum_k (c_k - z) s x_k  ~=  s * (d_j * sum_k c_k x16_k - z * X_j),  X_j = d_j * sum_k x16_k
 * X_j is the sum of the *quantized* x, so the result is exactly dequant(W) x^ for the
 * quantized x^: the only error is x's rounding, one part in 2^16 of each word's largest |x|.
 *
 * Pairing: a word holds CU = 32/W codes, H = CU/2 per 16-bit half. Pair p takes code p (low
 * half, bits W*p) and code H+p (high half, bits 16+W*p): (w >> W*p) & (M | M<<16) puts both in
 * place for vpmaddwd, and xp[p][j] holds the matching int16 pair (x16[CU*j+p], x16[CU*j+H+p]).
 * 3-bit: the 1-bit plane q_hi has 16 bits per low word (code i at bit i); spread so that bit
 * i and bit 8+i land at bit 2 and bit 18 of pair i, they are OR'd in as the code's 4s.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MP_AVX2 1
#endif

/* x's int16 pairs are stored in blocks of 8 words: [U/8][H][8], so the 8 words of one vector
 * step find their H pair vectors at one base pointer and constant offsets. */
#define XPI(h, p, j) ((((int64_t)(j) >> 3) * (h) + (p)) * 8 + ((j) & 7))

#define MP_OK 0
#define MP_UNSUPPORTED 1
#define MP_NOMEM 2

int moepack_abi_version(void) { return 1; }

int moepack_has_avx2(void) {
#ifdef MP_AVX2
    return 1;
#else
    return 0;
#endif
}

/* One row's (scale, zero) per word: the groups decoded, then repeated WPG = group/CU times. */
static void decode_row_meta(int64_t n, int64_t gpr, int64_t wpg, const uint8_t *scale, const float *smeta,
                            const uint8_t *zero, const float *zmeta, int64_t mg, float *sw, float *zw) {
    int64_t i0 = n * gpr;
    for (int64_t g = 0; g < gpr;) {  /* one pass per meta group the row overlaps */
        int64_t m = (i0 + g) / mg;
        int64_t e = (m + 1) * mg - i0;
        if (e > gpr) e = gpr;
        const float ss = smeta[2 * m], sm = smeta[2 * m + 1], zs = zmeta[2 * m], zm = zmeta[2 * m + 1];
        const uint8_t *sc = scale + i0, *zc = zero + i0;
        if (wpg == 1) {
            for (int64_t k = g; k < e; k++) {  /* vectorizes: u8 -> f32, one FMA */
                sw[k] = ss * (float)sc[k] + sm;
                zw[k] = zs * (float)zc[k] + zm;
            }
        } else {
            for (int64_t k = g; k < e; k++) {
                const float s = ss * (float)sc[k] + sm, z = zs * (float)zc[k] + zm;
                for (int64_t r = 0; r < wpg; r++) {
                    sw[k * wpg + r] = s;
                    zw[k * wpg + r] = z;
                }
            }
        }
        g = e;
    }
}

/* Word j of x [K] f32 -> xp[p][j] int16 pairs (as int32) for p < H, d[j], X[j] (see the top of
 * the file). */
static void quantize_x_word(const float *x, int cu, int64_t U, int64_t j, int32_t *xp, float *d, float *X) {
    const int h = cu / 2;
    {
        const float *xs = x + (int64_t)cu * j;
        float m = 0.0f;
        for (int i = 0; i < cu; i++) m = fmaxf(m, fabsf(xs[i]));
        const float dj = m / 32767.0f, inv = m > 0.0f ? 32767.0f / m : 0.0f;
        int32_t sum = 0;
        for (int p = 0; p < h; p++) {
            const int32_t lo = (int32_t)lrintf(xs[p] * inv), hi = (int32_t)lrintf(xs[h + p] * inv);
            sum += lo + hi;
            xp[XPI(h, p, j)] = (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
        }
        d[j] = dj;
        X[j] = dj * (float)sum;
    }
}

/* sum over words [j0, j1) of row n, portable C (the tail of the AVX2 loop, or all of it). */
static float row_scalar(const uint32_t *qn, const uint16_t *hn, int bits, int w, int64_t U, int64_t j0, int64_t j1,
                        const int32_t *xp, const float *d, const float *X, const float *sw, const float *zw) {
    const int cu = 32 / w, h = cu / 2;
    const uint32_t mask = (1u << w) - 1u;
    float acc = 0.0f;
    for (int64_t j = j0; j < j1; j++) {
        const uint32_t word = qn[j];
        const uint32_t hw = bits == 3 ? hn[j] : 0u;
        int32_t dot = 0;
        for (int p = 0; p < h; p++) {
            int32_t c0 = (int32_t)((word >> (w * p)) & mask), c1 = (int32_t)((word >> (16 + w * p)) & mask);
            if (bits == 3) {
                c0 |= (int32_t)(((hw >> p) & 1u) << 2);
                c1 |= (int32_t)(((hw >> (h + p)) & 1u) << 2);
            }
            const int32_t pair = xp[XPI(h, p, j)];
            dot += c0 * (int32_t)(int16_t)(pair & 0xFFFF) + c1 * (int32_t)(int16_t)((uint32_t)pair >> 16);
        }
        acc += sw[j] * (d[j] * (float)dot - zw[j] * X[j]);
    }
    return acc;
}

#ifdef MP_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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
        __m256i hs = _mm256_setzero_si256();
        if (bits == 3) {  /* 16 high bits per word -> bit i at i, bit 8+i at 16+i, then times 4 */
            const __m256i hw = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(hn + j)));
            const __m256i spread = _mm256_or_si256(_mm256_and_si256(hw, _mm256_set1_epi32(0xFF)),
                                                   _mm256_slli_epi32(_mm256_and_si256(hw, _mm256_set1_epi32(0xFF00)), 8));
            hs = _mm256_slli_epi32(spread, 2);
        }
        __m256i dot0 = _mm256_setzero_si256(), dot1 = _mm256_setzero_si256();
        for (int p = 0; p < h; p++) {
            __m256i v = _mm256_and_si256(_mm256_srli_epi32(word, w * p), pairmask);
            if (bits == 3) v = _mm256_or_si256(v, _mm256_and_si256(_mm256_srli_epi32(hs, p), hibit));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xp + XPI(h, p, j)));
            if (p & 1)
                dot1 = _mm256_add_epi32(dot1, _mm256_madd_epi16(v, xv));
            else
                dot0 = _mm256_add_epi32(dot0, _mm256_madd_epi16(v, xv));
        }
        const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(dot0, dot1));
        const __m256 zx = _mm256_mul_ps(_mm256_loadu_ps(zw + j), _mm256_loadu_ps(X + j));
        const __m256 dd = _mm256_fmsub_ps(f, _mm256_loadu_ps(d + j), zx);
        if (j & 8)
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(sw + j), dd, acc1);
        else
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(sw + j), dd, acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1)) + row_scalar(qn, hn, bits, w, U, j, j1, xp, d, X, sw, zw);
}


/* The fast path: meta decoded in registers, 8 groups at a time, inside the word loop, instead of
 * a per-row decode pass (that pass cost 25-45% of the time). Needs gpr and mg multiples of 8
 * (an 8-group block never straddles a meta group) and WPG = 2^wpg_log2 words per group: the
 * block's 8 scales reach word lanes through one permute. Xg: x summed per group (per token).
 *     y = sum_j s_j d_j f_j  -  sum_g s_g z_g Xg_g      (f_j: word j's integer dot) */
static inline __attribute__((always_inline)) float row_fast(const uint32_t *qn, const uint16_t *hn, const int bits,
                                                            const int w, int64_t gpr, int wpg_log2, int64_t i0,
                                                            const uint8_t *scale, const float *smeta,
                                                            const uint8_t *zero, const float *zmeta, int64_t mg,
                                                            const int32_t *xp, int64_t U, const float *d,
                                                            const float *Xg) {
    const int h = 16 / w;
    const uint32_t m = (1u << w) - 1u;
    const int64_t wpg = (int64_t)1 << wpg_log2;
    const __m256i pairmask = _mm256_set1_epi32((int)(m | (m << 16)));
    const __m256i hibit = _mm256_set1_epi32(0x00040004);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc = _mm256_setzero_ps(), accz = _mm256_setzero_ps();
    const uint8_t *sc = scale + i0, *zc = zero + i0;
    for (int64_t g0 = 0; g0 < gpr;) {
        const int64_t mi = (i0 + g0) / mg;
        int64_t e = (mi + 1) * mg - i0;
        if (e > gpr) e = gpr;
        const __m256 ss = _mm256_set1_ps(smeta[2 * mi]), sm = _mm256_set1_ps(smeta[2 * mi + 1]);
        const __m256 zs = _mm256_set1_ps(zmeta[2 * mi]), zm = _mm256_set1_ps(zmeta[2 * mi + 1]);
        for (int64_t gb = g0; gb < e; gb += 8) {
            const __m256 s8 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sc + gb)))), ss, sm);
            const __m256 z8 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zc + gb)))), zs, zm);
            accz = _mm256_fmadd_ps(_mm256_mul_ps(s8, z8), _mm256_loadu_ps(Xg + gb), accz);
            for (int64_t r = 0; r < wpg; r++) {
                const int64_t j = gb * wpg + 8 * r;
                const __m256i word = _mm256_loadu_si256((const __m256i *)(qn + j));
                const int32_t *xb = xp + (j >> 3) * 8 * h;  /* j is a multiple of 8 here */
                __m256i hs = _mm256_setzero_si256();
                if (bits == 3) {
                    const __m256i hw = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(hn + j)));
                    hs = _mm256_slli_epi32(
                        _mm256_or_si256(_mm256_and_si256(hw, _mm256_set1_epi32(0xFF)),
                                        _mm256_slli_epi32(_mm256_and_si256(hw, _mm256_set1_epi32(0xFF00)), 8)),
                        2);
                }
                __m256i dot0 = _mm256_setzero_si256(), dot1 = _mm256_setzero_si256();
                for (int p = 0; p < h; p++) {
                    __m256i v = _mm256_and_si256(_mm256_srli_epi32(word, w * p), pairmask);
                    if (bits == 3) v = _mm256_or_si256(v, _mm256_and_si256(_mm256_srli_epi32(hs, p), hibit));
                    const __m256i xv = _mm256_load_si256((const __m256i *)(xb + 8 * p));
                    if (p & 1)
                        dot1 = _mm256_add_epi32(dot1, _mm256_madd_epi16(v, xv));
                    else
                        dot0 = _mm256_add_epi32(dot0, _mm256_madd_epi16(v, xv));
                }
                const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot0, dot1)), _mm256_loadu_ps(d + j));
                __m256 sl = s8;
                if (wpg_log2 > 0) {  /* lane l is word 8r + l of the block: group (8r + l) >> log2(WPG) */
                    const __m256i idx = _mm256_srli_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)(8 * r)), iota), wpg_log2);
                    sl = _mm256_permutevar8x32_ps(s8, idx);
                }
                acc = _mm256_fmadd_ps(sl, f, acc);
            }
        }
        g0 = e;
    }
    return hsum8(acc) - hsum8(accz);
}
#endif

static int fast_path(int64_t gpr, int64_t mg, int64_t wpg) {
#ifdef MP_AVX2
    return gpr % 8 == 0 && mg % 8 == 0 && wpg > 0 && (wpg & (wpg - 1)) == 0;
#else
    (void)gpr, (void)mg, (void)wpg;
    return 0;
#endif
}

static int log2i(int64_t v) {
    int k = 0;
    while (((int64_t)1 << k) < v) k++;
    return k;
}

static float row_dot(const uint32_t *qn, const uint16_t *hn, int bits, int w, int64_t U, const int32_t *xp,
                     const float *d, const float *X, const float *sw, const float *zw) {
#ifdef MP_AVX2
    if (bits == 2) return row_avx2(qn, hn, 2, 2, U, U, xp, d, X, sw, zw);
    if (bits == 3) return row_avx2(qn, hn, 3, 2, U, U, xp, d, X, sw, zw);
    return row_avx2(qn, hn, 4, 4, U, U, xp, d, X, sw, zw);
#else
    return row_scalar(qn, hn, bits, w, U, 0, U, xp, d, X, sw, zw);
#endif
}

/* out[t, n] = sum_k W[n, k] x[t, k] for an N x K matrix of `bits`-bit codes (2, 3 or 4) in
 * groups of `group` columns with 8-bit meta (scale/zero codes per group; (step, min) float32
 * pairs per `mg` groups). q: low plane as u32 words [N][K/CU]; qhi: 3-bit high plane as u16
 * [N][K/CU] (else unused, may be NULL). threads <= 0: OpenMP's default.
 * Returns MP_UNSUPPORTED for a geometry this kernel does not handle (the caller falls back). */
int moepack_qgemv(const uint32_t *q, const uint16_t *qhi, const uint8_t *scale, const float *smeta,
                  const uint8_t *zero, const float *zmeta, int64_t mg, int bits, int64_t group, int64_t N,
                  int64_t K, const float *x, int64_t T, float *out, int threads) {
    if (bits != 2 && bits != 3 && bits != 4) return MP_UNSUPPORTED;
    const int w = bits == 4 ? 4 : 2, cu = 32 / w;
    if (K <= 0 || N <= 0 || T <= 0 || mg <= 0 || group % cu || K % group) return MP_UNSUPPORTED;
    if (bits == 3 && qhi == NULL) return MP_UNSUPPORTED;
    const int64_t U = K / cu, Up = (U + 7) / 8 * 8, gpr = K / group, wpg = group / cu, h = cu / 2;
    const int fast = fast_path(gpr, mg, wpg), wl = log2i(wpg);
    /* per token t: pairs xp [H][U] int32; d [U], X [U], Xg [gpr] f32 */
    int32_t *xp = (int32_t *)aligned_alloc(32, sizeof(int32_t) * (size_t)(T * h * Up));
    float *dX = (float *)malloc(sizeof(float) * (size_t)(T * (2 * U + gpr)));
    if (!xp || !dX) {
        free(xp);
        free(dX);
        return MP_NOMEM;
    }
#define XP(t) (xp + (t) * h * Up)
#define D(t) (dX + (t) * (2 * U + gpr))
#define XW(t) (D(t) + U)
#define XG(t) (D(t) + 2 * U)
    int failed = 0;
#ifdef _OPENMP
    const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt) reduction(| : failed)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t tj = 0; tj < T * U; tj++) quantize_x_word(x + (tj / U) * K, cu, U, tj % U, XP(tj / U), D(tj / U), XW(tj / U));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t tg = 0; tg < T * gpr; tg++) {  /* x summed per group: the zero-point term */
            const int64_t t = tg / gpr, g = tg % gpr;
            float sum = 0.0f;
            for (int64_t r = 0; r < wpg; r++) sum += XW(t)[g * wpg + r];
            XG(t)[g] = sum;
        }
        float *sw = fast ? NULL : (float *)malloc(sizeof(float) * (size_t)(2 * U));
        if (!fast && !sw) {
            failed = 1;
        } else {
            float *zw = fast ? NULL : sw + U;
#ifdef _OPENMP
#pragma omp for schedule(static, 16)
#endif
            for (int64_t n = 0; n < N; n++) {
                const uint32_t *qn = q + n * U;
                const uint16_t *hn = bits == 3 ? qhi + n * U : NULL;
#ifdef MP_AVX2
                if (fast) {
                    for (int64_t t = 0; t < T; t++) {
                        const float *xg = XG(t);
                        float y;
#define FAST(B, W, WL) row_fast(qn, hn, B, W, gpr, WL, n * gpr, scale, smeta, zero, zmeta, mg, XP(t), U, D(t), xg)
                        /* the quantizer's defaults get a build with WPG constant (loops unrolled) */
                        if (bits == 2)
                            y = wl == 0 ? FAST(2, 2, 0) : wl == 3 ? FAST(2, 2, 3) : FAST(2, 2, wl);
                        else if (bits == 3)
                            y = wl == 2 ? FAST(3, 2, 2) : wl == 1 ? FAST(3, 2, 1) : FAST(3, 2, wl);
                        else
                            y = wl == 3 ? FAST(4, 4, 3) : wl == 2 ? FAST(4, 4, 2) : FAST(4, 4, wl);
#undef FAST
                        out[t * N + n] = y;
                    }
                    continue;
                }
#endif
                decode_row_meta(n, gpr, wpg, scale, smeta, zero, zmeta, mg, sw, zw);
                for (int64_t t = 0; t < T; t++) out[t * N + n] = row_dot(qn, hn, bits, w, U, XP(t), D(t), XW(t), sw, zw);
            }
            free(sw);
        }
    }
#undef XP
#undef D
#undef XW
#undef XG
    (void)threads;
    (void)wl;
    free(xp);
    free(dX);
    return failed ? MP_NOMEM : MP_OK;
}
