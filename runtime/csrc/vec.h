/* moe-pack CPU kernel: the vector operations of the row template (row_fast.h) at two widths.
 *
 *   v8_*   8 int32/float lanes: AVX2 (+ FMA), and VNNI's vpdpwssd where the compiler sees it.
 *   v16_*  16 lanes: AVX-512 (F + BW, VNNI where present) when the compiler targets it; or, with
 *          MP_EMULATE_WIDE on an AVX2 machine, two 8-lane halves.
 *
 * Why 16 lanes: on Intel server cores the word loop is bound by the two ports that take 256-bit
 * shifts and multiplies; a 512-bit op does twice the work per port slot (llvm-mca, Sapphire
 * Rapids: 0.70 cycles per word of codes against 1.15 at 256 bits, inner loop). The emulated
 * build runs the same 16-lane code (blocks of 16 words and groups, x in blocks of 16) where there
 * is no AVX-512, so the tests check its logic on any AVX2 machine; only the intrinsics below
 * differ, one to one, and a native build is checked against the reference decode when it loads
 * (runtime/cpu_native.py), falling back to 8 lanes if it disagrees. */
#ifndef MP_VEC_H
#define MP_VEC_H
#ifdef MP_AVX2

#define AI static inline __attribute__((always_inline))

typedef __m256i v8i;
typedef __m256 v8f;

AI v8i v8_loadu(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
AI v8i v8_set1(int32_t a) { return _mm256_set1_epi32(a); }
AI v8i v8_zero(void) { return _mm256_setzero_si256(); }
AI v8i v8_and(v8i a, v8i b) { return _mm256_and_si256(a, b); }
AI v8i v8_or(v8i a, v8i b) { return _mm256_or_si256(a, b); }
AI v8i v8_add(v8i a, v8i b) { return _mm256_add_epi32(a, b); }
AI v8i v8_srli16(v8i a, int n) { return _mm256_srli_epi16(a, n); }
AI v8i v8_srli32(v8i a, int n) { return _mm256_srli_epi32(a, n); }
AI v8i v8_slli32(v8i a, int n) { return _mm256_slli_epi32(a, n); }
AI v8i v8_dot(v8i acc, v8i a, v8i b) { return MP_DOT(acc, a, b); }
AI v8i v8_load_u16(const uint16_t *p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)); }
AI v8i v8_iota(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
AI v8f v8_cvt(v8i a) { return _mm256_cvtepi32_ps(a); }
AI v8f v8_loadf(const float *p) { return _mm256_loadu_ps(p); }
AI v8f v8_set1f(float a) { return _mm256_set1_ps(a); }
AI v8f v8_zerof(void) { return _mm256_setzero_ps(); }
AI v8f v8_mul(v8f a, v8f b) { return _mm256_mul_ps(a, b); }
AI v8f v8_fma(v8f a, v8f b, v8f c) { return _mm256_fmadd_ps(a, b, c); }
AI v8f v8_permute(v8f s, v8i idx) { return _mm256_permutevar8x32_ps(s, idx); }
/* lanes l < k from a, the others from b */
AI v8f v8_first(int64_t k, v8f a, v8f b) {
    const int32_t kk = (int32_t)(k < 0 ? 0 : k > 8 ? 8 : k);
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(kk), v8_iota())));
}

AI float v8_hsum(v8f v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The codes of groups i .. i+7 as 8 int32 lanes. 4-bit: i is a multiple of 8 (the fast path's
 * blocks), so they are the 8 nibbles of one little-endian u32, group i + k at bits 4k: broadcast,
 * shift each lane's nibble to the top, shift it down (no mask constant held in a register).
 * 2-bit g16 on one dev-cpu core: 20.1 cycles per 128 weights against 17.5 with byte codes
 * (tools/cpu_kernel_cycles.c); an unpack of nibble pairs took 20.4, a mask 20.3. */
AI v8i v8_meta(const uint8_t *codes, int64_t i, const int mb) {
    if (mb == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
    int32_t eight;
    memcpy(&eight, codes + (i >> 1), 4);
    const __m256i top = _mm256_sllv_epi32(_mm256_set1_epi32(eight), _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
    return _mm256_srli_epi32(top, 28);
}

/* int8 activations (qgemv_cpu.c, quantize_x_word8): the nv byte vectors of a step's words (codes,
 * unsigned) times x's bytes (signed) at x + stride k, summed per int32 lane, i.e. per word.
 * vpdpbusd where the CPU has VNNI, in two chains. Else vpmaddubsw per vector, which cannot
 * saturate (2 * 15 * 127 < 32767), the int16 sums added (at most 4 * 2 * 7 * 127 or
 * 2 * 2 * 15 * 127, both < 32767), then widened once by vpmaddwd against ones. */
AI v8i v8_dotbs(const v8i *v, const int32_t *x, const int nv, const int stride) {
#ifdef MP_DOTB
    v8i a0 = MP_DOTB(v8_zero(), v[0], v8_loadu(x)), a1 = MP_DOTB(v8_zero(), v[1], v8_loadu(x + stride));
    for (int k = 2; k < nv; k += 2) {
        a0 = MP_DOTB(a0, v[k], v8_loadu(x + stride * k));
        a1 = MP_DOTB(a1, v[k + 1], v8_loadu(x + stride * (k + 1)));
    }
    return _mm256_add_epi32(a0, a1);
#else
    __m256i s = _mm256_maddubs_epi16(v[0], v8_loadu(x));
    for (int k = 1; k < nv; k++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(v[k], v8_loadu(x + stride * k)));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
}
AI v8i v8_dotb(const v8i *v, const int32_t *x, const int nv) { return v8_dotbs(v, x, nv, 8); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MP_WIDE 1
typedef __m512i v16i;
typedef __m512 v16f;

AI v16i v16_loadu(const void *p) { return _mm512_loadu_si512(p); }
AI v16i v16_set1(int32_t a) { return _mm512_set1_epi32(a); }
AI v16i v16_zero(void) { return _mm512_setzero_si512(); }
AI v16i v16_and(v16i a, v16i b) { return _mm512_and_si512(a, b); }
AI v16i v16_or(v16i a, v16i b) { return _mm512_or_si512(a, b); }
AI v16i v16_add(v16i a, v16i b) { return _mm512_add_epi32(a, b); }
AI v16i v16_srli16(v16i a, int n) { return _mm512_srli_epi16(a, (unsigned)n); }
AI v16i v16_srli32(v16i a, int n) { return _mm512_srli_epi32(a, (unsigned)n); }
AI v16i v16_slli32(v16i a, int n) { return _mm512_slli_epi32(a, (unsigned)n); }
#ifdef __AVX512VNNI__
AI v16i v16_dot(v16i acc, v16i a, v16i b) { return _mm512_dpwssd_epi32(acc, a, b); }
#else
AI v16i v16_dot(v16i acc, v16i a, v16i b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
AI v16i v16_load_u16(const uint16_t *p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)); }
AI v16i v16_dotb(const v16i *v, const int32_t *x, const int nv) {  /* v8_dotbs at 16 lanes */
#ifdef __AVX512VNNI__
    v16i a0 = _mm512_dpbusd_epi32(v16_zero(), v[0], v16_loadu(x)), a1 = _mm512_dpbusd_epi32(v16_zero(), v[1], v16_loadu(x + 16));
    for (int k = 2; k < nv; k += 2) {
        a0 = _mm512_dpbusd_epi32(a0, v[k], v16_loadu(x + 16 * k));
        a1 = _mm512_dpbusd_epi32(a1, v[k + 1], v16_loadu(x + 16 * (k + 1)));
    }
    return _mm512_add_epi32(a0, a1);
#else
    __m512i s = _mm512_maddubs_epi16(v[0], v16_loadu(x));
    for (int k = 1; k < nv; k++) s = _mm512_add_epi16(s, _mm512_maddubs_epi16(v[k], v16_loadu(x + 16 * k)));
    return _mm512_madd_epi16(s, _mm512_set1_epi16(1));
#endif
}

AI v16i v16_iota(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
AI v16f v16_cvt(v16i a) { return _mm512_cvtepi32_ps(a); }
AI v16f v16_loadf(const float *p) { return _mm512_loadu_ps(p); }
AI v16f v16_set1f(float a) { return _mm512_set1_ps(a); }
AI v16f v16_zerof(void) { return _mm512_setzero_ps(); }
AI v16f v16_mul(v16f a, v16f b) { return _mm512_mul_ps(a, b); }
AI v16f v16_fma(v16f a, v16f b, v16f c) { return _mm512_fmadd_ps(a, b, c); }
AI v16f v16_permute(v16f s, v16i idx) { return _mm512_permutexvar_ps(idx, s); }
AI v16f v16_first(int64_t k, v16f a, v16f b) {
    const int32_t kk = (int32_t)(k < 0 ? 0 : k > 16 ? 16 : k);
    return _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(_mm512_set1_epi32(kk), v16_iota()), b, a);
}
AI float v16_hsum(v16f v) {  /* the upper half through a 64-bit extract: AVX512F (32-bit lanes need DQ) */
    return v8_hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
/* 16 groups: two 8-group decodes (the 4-bit meta needs a nibble-aligned start: i + 8 is one) */
AI v16i v16_meta(const uint8_t *codes, int64_t i, const int mb) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(v8_meta(codes, i, mb)), v8_meta(codes, i + 8, mb), 1);
}

#elif defined(MP_EMULATE_WIDE)
#define MP_WIDE 1
typedef struct { v8i lo, hi; } v16i;
typedef struct { v8f lo, hi; } v16f;

#define MP_HALVES_I(expr_lo, expr_hi) { v16i r_ = {expr_lo, expr_hi}; return r_; }
#define MP_HALVES_F(expr_lo, expr_hi) { v16f r_ = {expr_lo, expr_hi}; return r_; }
AI v16i v16_loadu(const void *p) MP_HALVES_I(v8_loadu(p), v8_loadu((const char *)p + 32))
AI v16i v16_set1(int32_t a) MP_HALVES_I(v8_set1(a), v8_set1(a))
AI v16i v16_zero(void) MP_HALVES_I(v8_zero(), v8_zero())
AI v16i v16_and(v16i a, v16i b) MP_HALVES_I(v8_and(a.lo, b.lo), v8_and(a.hi, b.hi))
AI v16i v16_or(v16i a, v16i b) MP_HALVES_I(v8_or(a.lo, b.lo), v8_or(a.hi, b.hi))
AI v16i v16_add(v16i a, v16i b) MP_HALVES_I(v8_add(a.lo, b.lo), v8_add(a.hi, b.hi))
AI v16i v16_srli16(v16i a, int n) MP_HALVES_I(v8_srli16(a.lo, n), v8_srli16(a.hi, n))
AI v16i v16_srli32(v16i a, int n) MP_HALVES_I(v8_srli32(a.lo, n), v8_srli32(a.hi, n))
AI v16i v16_slli32(v16i a, int n) MP_HALVES_I(v8_slli32(a.lo, n), v8_slli32(a.hi, n))
AI v16i v16_dot(v16i acc, v16i a, v16i b) MP_HALVES_I(v8_dot(acc.lo, a.lo, b.lo), v8_dot(acc.hi, a.hi, b.hi))
AI v16i v16_load_u16(const uint16_t *p) MP_HALVES_I(v8_load_u16(p), v8_load_u16(p + 8))
AI v16i v16_dotb(const v16i *v, const int32_t *x, const int nv) {  /* x's 16 words: 8 at x, 8 at x + 8 */
    v8i lo[4], hi[4];
    for (int k = 0; k < nv; k++) lo[k] = v[k].lo, hi[k] = v[k].hi;
    MP_HALVES_I(v8_dotbs(lo, x, nv, 16), v8_dotbs(hi, x + 8, nv, 16))
}
AI v16i v16_iota(void) MP_HALVES_I(v8_iota(), v8_add(v8_iota(), v8_set1(8)))
AI v16f v16_cvt(v16i a) MP_HALVES_F(v8_cvt(a.lo), v8_cvt(a.hi))
AI v16f v16_loadf(const float *p) MP_HALVES_F(v8_loadf(p), v8_loadf(p + 8))
AI v16f v16_set1f(float a) MP_HALVES_F(v8_set1f(a), v8_set1f(a))
AI v16f v16_zerof(void) MP_HALVES_F(v8_zerof(), v8_zerof())
AI v16f v16_mul(v16f a, v16f b) MP_HALVES_F(v8_mul(a.lo, b.lo), v8_mul(a.hi, b.hi))
AI v16f v16_fma(v16f a, v16f b, v16f c) MP_HALVES_F(v8_fma(a.lo, b.lo, c.lo), v8_fma(a.hi, b.hi, c.hi))
/* lane l = s[idx_l] across both halves: each half permuted by the low 3 bits, bit 3 picks */
AI v8f mp_pick16(v16f s, v8i idx) {
    const v8f hi_mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, v8_set1(7)));
    return _mm256_blendv_ps(v8_permute(s.lo, idx), v8_permute(s.hi, idx), hi_mask);
}
AI v16f v16_permute(v16f s, v16i idx) MP_HALVES_F(mp_pick16(s, idx.lo), mp_pick16(s, idx.hi))
AI v16f v16_first(int64_t k, v16f a, v16f b) MP_HALVES_F(v8_first(k, a.lo, b.lo), v8_first(k - 8, a.hi, b.hi))
AI float v16_hsum(v16f v) { return v8_hsum(_mm256_add_ps(v.lo, v.hi)); }
AI v16i v16_meta(const uint8_t *codes, int64_t i, const int mb) MP_HALVES_I(v8_meta(codes, i, mb), v8_meta(codes, i + 8, mb))
#endif

/* Pair p of a vector of words as int16 lanes (code p of each 16-bit half). The top pair needs no
 * mask: a 16-bit shift leaves only it. 2-bit codes are telescoped: from p = 1 on, the shifted
 * half keeps codes p..7 (v_p = c_p + 4 v_(p+1)), and x holds x_p - 4 x_(p-1) (quantize_x_word in
 * qgemv_cpu.c), so
 *     sum_p c_p x_p = c_0 x_0 + v_1 x_1 + sum_(p>=2) v_p (x_p - 4 x_(p-1))
 * with one shift per pair and no mask: the loop's shift and multiply ports are its limit. */
#define MP_DEF_PAIR(P, VI)                                                                  \
    AI VI P##_pair(VI word, VI pairmask, const int bits, const int w, const int h, const int p) { \
        if (p == 0) return P##_and(word, pairmask);                                         \
        if (bits == 2 || p == h - 1) return P##_srli16(word, w * p);                        \
        return P##_and(P##_srli32(word, w * p), pairmask);                                  \
    }
/* The 3-bit high plane of a vector of words (16 bits each, code i at bit i) spread so that bit
 * i and bit 8+i land at bit 2 and bit 18 of pair i, ready to be OR'd in as the codes' 4s. */
#define MP_DEF_HI3(P, VI)                                                                   \
    AI VI P##_hi3(const uint16_t *hn) {                                                     \
        const VI hw = P##_load_u16(hn);                                                     \
        return P##_slli32(P##_or(P##_and(hw, P##_set1(0xFF)), P##_slli32(P##_and(hw, P##_set1(0xFF00)), 8)), 2); \
    }
/* int8 activations, 3-bit: the high plane of a vector of words (16 bits each, code i at bit i) as
 * nibbles, nibble b (the high bits of codes 4b .. 4b+3) in byte b; bit k of byte b is then the
 * high bit of byte b of the step's byte vector k (row_fast.h). */
#define MP_DEF_HI3B(P, VI)                                                                  \
    AI VI P##_hi3b(const uint16_t *hn) {                                                    \
        VI t = P##_load_u16(hn);                                                            \
        t = P##_and(P##_or(t, P##_slli32(t, 8)), P##_set1(0x00FF00FF));                     \
        return P##_and(P##_or(t, P##_slli32(t, 4)), P##_set1(0x0F0F0F0F));                  \
    }
/* Each word lane's group scale when a group spans 2^wl words: lane l of step r of a block is
 * word L*r + l, group (L*r + l) >> wl. */
#define MP_DEF_LANES(P, VI, VF, L)                                                          \
    AI VF P##_lanes(VF s, int64_t r, const int wl) {                                        \
        return P##_permute(s, P##_srli32(P##_add(P##_set1((int32_t)(L * r)), P##_iota()), wl)); \
    }
MP_DEF_PAIR(v8, v8i)
MP_DEF_HI3(v8, v8i)
MP_DEF_HI3B(v8, v8i)
MP_DEF_LANES(v8, v8i, v8f, 8)
#ifdef MP_WIDE
MP_DEF_PAIR(v16, v16i)
MP_DEF_HI3(v16, v16i)
MP_DEF_HI3B(v16, v16i)
MP_DEF_LANES(v16, v16i, v16f, 16)
#endif

#endif /* MP_AVX2 */
#ifndef MP_WIDE
#define MP_WIDE 0
#endif
#endif /* MP_VEC_H */
