/* moe-pack CPU kernel (qgemv_cpu.c): x rounded for the integer dot products, per 32-bit word
 * of codes (see the top of qgemv_cpu.c): int16 pairs (quantize_x_word) or int8 bytes
 * (quantize_x_word8), each word with its step d and the sum X of its rounded values, and the
 * per-token buffers (mp_xq) every row of a GEMV reads. Included once, by kernel.h, after
 * mp_geo, XPI and TELE_STEPS. */

/* lrintf(v): the nearest integer in the current rounding mode (ties to even by default), without
 * the libm call gcc keeps for errno unless -fno-math-errno. That call was most of a GEMV's fixed
 * cost: ~31 us per 4096-wide call on dev-cpu (BENCHMARKS.md section 27). |v| <= 32767 here. */
static inline int32_t round_i32(float v) {
#ifdef __SSE2__
    return _mm_cvtss_si32(_mm_set_ss(v));
#else
    return (int32_t)lrintf(v);
#endif
}

/* The rounding of one word's cu values xs to `steps` integer steps of their largest |x|: the
 * factor to multiply by (*inv) and the step d returned. */
static inline float word_scale(const float *xs, int cu, float steps, float *inv) {
    float m = 0.0f;
    int finite = 1;
    for (int i = 0; i < cu; i++) {  /* not fmaxf: a libm call */
        const float a = fabsf(xs[i]);
        m = a > m ? a : m;
        finite &= a <= FLT_MAX;  /* false for NaN and inf */
    }
    /* a word of (near-)zeros rounds to zeros: steps / m would overflow for a subnormal m. A word
     * with a NaN or an inf (x is checked on entry, but w2's input h is not: w1 x can overflow)
     * rounds to zeros with d NaN, so the rows' sums are NaN as the float matmul's would be */
    *inv = finite && m > 1e-30f ? steps / m : 0.0f;
    return !finite ? NAN : *inv > 0.0f ? m / steps : 0.0f;
}

/* Word j of x [K] f32 -> xp[p][j] int16 pairs (as int32) for p < H, d[j], X[j] (see the top of
 * the file). tele: the telescoped pairs of 2-bit codes (TELE_STEPS). */
static void quantize_x_word(const float *x, int cu, int tele, int xb, int64_t j, int32_t *xp, float *d, float *X) {
    const int h = cu / 2;
    const float *xs = x + (int64_t)cu * j;
    float inv;
    const float dj = word_scale(xs, cu, tele ? TELE_STEPS : 32767.0f, &inv);
    int32_t sum = 0, prev_lo = 0, prev_hi = 0;
    for (int p = 0; p < h; p++) {
        const int32_t lo = round_i32(xs[p] * inv), hi = round_i32(xs[h + p] * inv);
        sum += lo + hi;
        /* telescoped: code p meets x_p - 4 x_(p-1) from p = 2 on (|x| <= 6553 keeps it in int16) */
        const int32_t a = tele && p >= 2 ? lo - 4 * prev_lo : lo, b = tele && p >= 2 ? hi - 4 * prev_hi : hi;
        prev_lo = lo;
        prev_hi = hi;
        xp[XPI(xb, h, p, j)] = (int32_t)((uint32_t)(uint16_t)a | ((uint32_t)(uint16_t)b << 16));
    }
    d[j] = dj;
    X[j] = dj * (float)sum;
}

/* int8 activations: word j of x [K] f32 -> bytes, d[j], X[j] as quantize_x_word's, |x8| <= 127.
 * The word's nv = CU/4 int32 of xp hold byte b of vector k = x8[nv b + k], the order in which
 * row_fast.h's shifts and masks lay the codes out. */
static void quantize_x_word8(const float *x, int cu, int xb, int64_t j, int32_t *xp, float *d, float *X) {
    const int nv = cu / 4;
    const float *xs = x + (int64_t)cu * j;
    float inv;
    const float dj = word_scale(xs, cu, 127.0f, &inv);
    int32_t sum = 0;
    for (int k = 0; k < nv; k++) {
        uint32_t packed = 0;
        for (int b = 0; b < 4; b++) {
            const int32_t v = round_i32(xs[nv * b + k] * inv);
            sum += v;
            packed |= (uint32_t)(uint8_t)(int8_t)v << (8 * b);
        }
        xp[XPI(xb, nv, k, j)] = (int32_t)packed;
    }
    d[j] = dj;
    X[j] = dj * (float)sum;
}

/* x of T tokens rounded for one geometry: pairs xp [T][Up/8][H][8] int32, then per token
 * d [U], X [U], Xg [gpr] f32 */
typedef struct {
    int32_t *xp;
    float *dX;
} mp_xq;

/* A row's last part-block (row_fast.h) reads x's padding words and up to 7 floats past the
 * last token's Xg, with scale 0: both are zeroed here, so that what it reads is finite. */
static int xq_alloc(const mp_geo *g, int64_t T, mp_xq *q) {
    /* aligned_alloc wants a size that is a multiple of the alignment */
    q->xp = (int32_t *)aligned_alloc(64, (sizeof(int32_t) * (size_t)(T * g->h * g->Up) + 63) / 64 * 64);
    q->dX = (float *)malloc(sizeof(float) * (size_t)(T * (2 * g->U + g->gpr) + 16));
    if (!q->xp || !q->dX) return MP_NOMEM;
    /* a block of x's pairs, words [Up - xb, Up): h int32 per word, or CU/4 with int8 activations */
    const int64_t per_word = g->a8 ? g->cu / 4 : g->h, block = per_word * g->xb;
    for (int64_t t = 0; t < T; t++)
        memset(q->xp + t * g->h * g->Up + per_word * g->Up - block, 0, sizeof(int32_t) * (size_t)block);
    memset(q->dX + T * (2 * g->U + g->gpr), 0, sizeof(float) * 16);
    return MP_OK;
}

static void xq_free(mp_xq *q) {
    free(q->xp);
    free(q->dX);
}

#define XP(g, q, t) ((q)->xp + (t) * (g)->h * (g)->Up)
#define XD(g, q, t) ((q)->dX + (t) * (2 * (g)->U + (g)->gpr))
#define XW(g, q, t) (XD(g, q, t) + (g)->U)
#define XG(g, q, t) (XD(g, q, t) + 2 * (g)->U)

/* Round x [T][K] into q. Called by every thread of a parallel region (orphaned worksharing;
 * each loop ends in a barrier) or outside one (then serially). */
static void xq_fill(const mp_geo *g, const float *x, int64_t K, int64_t T, mp_xq *q) {
    /* collapse(2), not one flattened loop: that divided by U per word (a 64-bit division; 3%
     * of a 16 x 4096 call on dev-cpu) */
#ifdef _OPENMP
#pragma omp for schedule(static) collapse(2)
#endif
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < g->U; j++) {
            if (g->a8)
                quantize_x_word8(x + t * K, g->cu, g->xb, j, XP(g, q, t), XD(g, q, t), XW(g, q, t));
            else
                quantize_x_word(x + t * K, g->cu, g->tele, g->xb, j, XP(g, q, t), XD(g, q, t), XW(g, q, t));
        }
#ifdef _OPENMP
#pragma omp for schedule(static) collapse(2)
#endif
    for (int64_t t = 0; t < T; t++)
        for (int64_t gi = 0; gi < g->gpr; gi++) {  /* x summed per group: the zero-point term */
            float sum = 0.0f;
            for (int64_t r = 0; r < g->wpg; r++) sum += XW(g, q, t)[gi * g->wpg + r];
            XG(g, q, t)[gi] = sum;
        }
}
