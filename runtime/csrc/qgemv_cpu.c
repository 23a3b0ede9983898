/* moe-pack CPU kernel: y = W x for one HQQ-quantized matrix straight from its .moepack bytes
 * (docs/FORMAT.md, "Quantized matrices" and "Bit planes"), multi-threaded with OpenMP.
 *
 * Built at first use by runtime/cpu_build.py with the machine's C compiler
 * (-O3 -march=native -fopenmp) and called through ctypes; no Python headers needed.
 *
 * Why integers: the float kernel (runtime/cpu_expert.py, numba) spends one int->float
 * conversion and one FMA per weight and lane, and the conversion port is its bottleneck.
 * Here x is quantized per 32-bit word of codes to int16 with its own scale d
 * (x ~= d * x16, |x16| <= 32767: 2^-16 of the word's largest |x|, finer than fp16's 2^-11;
 * 2-bit codes: |x16| <= 6553, 2^-13.7, because their pairs are telescoped, see vec.h, _pair),
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
 *
 * int8 activations (opt-in, moepack_set_act8): the same per-word d_j and X_j with 127 steps,
 * and the codes as bytes: vector k of a word's bytes holds code nv*b + k in byte b (nv = CU/4),
 * one shift and one mask each, met by x's bytes in vpmaddubsw (vpdpbusd with VNNI): 4 products
 * per instruction and lane instead of 2. llama.cpp's Q8_K rounds x per 256 values; this per 16.
 */
#include "kernel.h"


int moepack_abi_version(void) { return 12; }

/* The 16-lane path (vec.h) is used where it is built and not switched off: the loader turns it
 * off when its self-check fails (falling back to 8 lanes), and MOEPACK_CPU_WIDE=0 does too.
 * Set before any call runs, never during one. */
static int mp_wide_on = MP_WIDE;

int moepack_has_wide(void) { return MP_WIDE; }

int moepack_set_wide(int on) {
    mp_wide_on = on && MP_WIDE;
    return mp_wide_on;
}

/* int8 activations (quantize_x_word8) on the fast path's default geometries (fast_default),
 * where on: x rounded to 2^-8 of each word's largest |x|, not the int16 path's 2^-13.7 (2-bit)
 * or 2^-16, for about half the instructions per weight. Off by default: issue #7 holds a CPU
 * expert to the GPU path's result within floating-point tolerance, which int16 meets. Modes:
 * 0 off, 1 on (16 lanes where mp_wide_on and the shape allow), 2 on at 8 lanes only, which the
 * loader picks when int8's 16-lane rows (AVX-512, vpdpbusd with VNNI) fail its check while the
 * 8-lane ones pass: int16 keeps its 16 lanes then. Set like mp_wide_on: before any call runs,
 * never during one. Returns the mode now in effect (0 without AVX2). */
static int mp_act8_on = 0;

int moepack_set_act8(int mode) {
#ifdef MP_AVX2
    mp_act8_on = mode == 1 || mode == 2 ? mode : 0;
#else
    (void)mode;
#endif
    return mp_act8_on;
}

int moepack_has_vnni(void) {
#ifdef MP_AVX2
    return MP_VNNI;
#else
    return 0;
#endif
}

int moepack_has_avx2(void) {
#ifdef MP_AVX2
    return 1;
#else
    return 0;
#endif
}

#include "row_general.h"

/* Whether rows of this geometry take the fast path at `lanes` words per step (row_fast.h):
 * groups of a power-of-two number of words, and at least one whole block per row. 16 lanes
 * take blocks that tile the rows and the meta groups exactly; 8 lanes also take blocks that
 * straddle meta groups of at least 8 groups, and rows that end in a part of a block (the
 * 576-wide rows of the demo's SmolLM2 took 3-7x longer per weight on the per-row path), except
 * with 4-bit meta codes on rows of an odd number of groups, whose blocks would start mid-byte. */
static int fast_path(int64_t gpr, int64_t mg, int64_t wpg, int mb, int lanes) {
#ifdef MP_AVX2
    if (wpg <= 0 || (wpg & (wpg - 1)) != 0) return 0;
    if (gpr % lanes == 0 && mg % lanes == 0) return 1;
    return lanes == 8 && gpr >= 8 && mg >= 8 && !(mb == 4 && gpr % 2);  /* a block meets two meta groups at most */
#else
    (void)gpr, (void)mg, (void)wpg, (void)mb, (void)lanes;
    return 0;
#endif
}

/* The fast path's geometries that fast_values unrolls for several tokens: the quantizer's
 * defaults (2-bit g16, 3-bit g64 with 8- or 4-bit meta, 4-bit g64 with 8-bit meta). The int8
 * path is built for these only, the others keep int16. */
static int fast_default(int bits, int wl, int mb) {
    return (bits == 2 && wl == 0) || (bits == 3 && wl == 2) || (bits == 4 && wl == 3 && mb == 8);
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


static int geometry(const mp_mat *m, mp_geo *g) {
    if (packed_supported(m) != MP_OK) return MP_UNSUPPORTED;
    g->w = packed_width(m->bits);
    g->cu = 32 / g->w;
    g->U = m->K / g->cu;
    g->gpr = m->K / m->group;
    g->wpg = m->group / g->cu;
    g->h = g->cu / 2;
    g->fast = fast_path(g->gpr, m->mg, g->wpg, m->mb, 8);
    g->wl = log2i(g->wpg);
    g->tele = m->bits == 2;
    g->a8 = mp_act8_on && g->fast && fast_default(m->bits, g->wl, m->mb);
    g->xb = mp_wide_on && !(g->a8 && mp_act8_on == 2) && fast_path(g->gpr, m->mg, g->wpg, m->mb, 16) ? 16 : 8;
    g->Up = (g->U + g->xb - 1) / g->xb * g->xb;
    return MP_OK;
}

static inline float silu(float a) { return a / (1.0f + expf(-a)); }

#include "fast_rows.h"

#ifdef MP_AVX2
/* fast_values for decode in its own function: it returns its value (through memory, 3-bit rows
 * took 7% longer on dev-cpu) and has nt and the token constants. */
static float fast_value(const mp_mat *a, const mp_geo *g, const mp_xq *q, int64_t n) {
    float v;
    fast_values(a, g, q, n, 0, 1, &v);
    return v;
}

/* fast_values for a prompt's tokens: MP_TB at a time (mp_fast_tokens4, prompt_cpu.c), or 2
 * (mp_fast_tokens2, prompt2_cpu.c; both declared in fast_rows.h). These copies are most of the
 * library's build time, so they sit in files of their own, which runtime/cpu_build.py compiles in
 * parallel with this one. One token takes the decode copy on a view of x that starts at it. */

static void fast_tokens(const mp_mat *a, const mp_geo *g, const mp_xq *q, int64_t n, int64_t t0, int nt, float *v) {
    if (nt == MP_TB) {
        mp_fast_tokens4(a, g, q, n, t0, v);
    } else if (nt == 2) {
        mp_fast_tokens2(a, g, q, n, t0, v);
    } else {
        const mp_xq qt = {XP(g, q, t0), XD(g, q, t0)};
        v[0] = fast_value(a, g, &qt, n);
    }
}
#endif

/* Row n of m times token t of q off the fast path. sw/zw: this thread's [U] buffers; decoded:
 * they hold row n's meta already. */
static float row_value(const mp_mat *m, const mp_geo *g, const mp_xq *q, int64_t n, int64_t t, float *sw,
                       float *zw, int decoded) {
    const uint32_t *qn = m->q + n * g->U;
    const uint16_t *hn = m->bits == 3 ? m->qhi + n * g->U : NULL;
    if (!decoded) decode_row_meta(n, g->gpr, g->wpg, m->scale, m->smeta, m->zero, m->zmeta, m->mg, m->mb, sw, zw);
    return row_dot(qn, hn, m->bits, g->w, g->U, XP(g, q, t), XD(g, q, t), XW(g, q, t), sw, zw);
}

/* 1 where the matrix desc (matrix_at's 12 numbers, at base 0) takes int8 activations now:
 * mp_act8_on and one of fast_default's geometries on the fast path. Lets the caller's check
 * (runtime/cpu_native.py, self_check) know which rounding to compare with. */
int moepack_uses_act8(const int64_t *desc) {
    static const uint16_t plane = 0;  /* geometry looks at whether a 3-bit matrix has a high plane, not into it */
    const mp_mat m = {NULL, desc[1] >= 0 ? &plane : NULL, NULL, NULL, NULL, NULL, desc[6], desc[7], desc[8], desc[9],
                      (int)desc[10], (int)desc[11]};
    mp_geo g;
    return geometry(&m, &g) == MP_OK && g.a8;
}

/* int16 rounding needs a finite x: both entry points decline otherwise (the caller falls back
 * to a float kernel, which propagates inf and nan as the reference does). */
static int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* Rows per dynamic chunk: 8 chunks per thread, at least 16 rows. Chunks of 16 rows handed out
 * in turn had each thread's reads jump every 16-64 KB, restarting the hardware prefetchers'
 * streams: one 2-bit expert on dev-cpu's 2 threads took 4.1 ms at int16 (3.4 at int8), against
 * 3.5 (2.9) now. 8 chunks per thread still let the others take a descheduled thread's share
 * (BENCHMARKS.md section 28). */
static int64_t row_chunk(int64_t N) {
#ifdef _OPENMP
    const int64_t chunk = N / (8 * (int64_t)omp_get_num_threads());
    return chunk < 16 ? 16 : chunk;
#else
    (void)N;
    return 16;
#endif
}

/* out[t][n] = (A x_t)[n], or silu(A x_t)[n] * (B x_t)[n] when B is given (same geometry as A).
 * Inside a parallel region (orphaned worksharing). Returns nonzero if a buffer failed. */
static int gemv_rows(const mp_mat *a, const mp_mat *b, const mp_geo *g, const mp_xq *q, int64_t T, float *out) {
    const int64_t N = a->N, chunk = row_chunk(N);
#ifdef MP_AVX2
    if (g->fast) {
        if (T == 1) {  /* decode */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)  /* dynamic: a descheduled thread does not hold the call (3-bit on 2 threads with a busy core 8.9 ms, 15.1 static) */
#endif
            for (int64_t n = 0; n < N; n++) {
                const float ya = fast_value(a, g, q, n);
                out[n] = b == NULL ? ya : silu(ya) * fast_value(b, g, q, n);
            }
            return 0;
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
        for (int64_t n = 0; n < N; n++) {
            for (int64_t t = 0; t < T;) {
                /* MP_TB at every width, 2-bit at 8 lanes too since a pass takes one token's
                 * chains at a time (row_fast.h; it ran passes of 2 before, 4 tokens' chains at
                 * once spilling out of AVX2's 16 registers) */
                const int nt = T - t >= MP_TB ? MP_TB : T - t >= 2 ? 2 : 1;
                float ya[MP_TB], yb[MP_TB];
                fast_tokens(a, g, q, n, t, nt, ya);
                if (b == NULL) {
                    for (int i = 0; i < nt; i++) out[(t + i) * N + n] = ya[i];
                } else {
                    fast_tokens(b, g, q, n, t, nt, yb);
                    for (int i = 0; i < nt; i++) out[(t + i) * N + n] = silu(ya[i]) * yb[i];
                }
                t += nt;
            }
        }
        return 0;
    }
#endif
    float *buf = (float *)malloc(sizeof(float) * (size_t)(4 * g->U));
    const int failed = !buf;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
    for (int64_t n = 0; n < N; n++) {
        if (failed) continue;
        for (int64_t t = 0; t < T; t++) {
            const float ya = row_value(a, g, q, n, t, buf, buf + g->U, t > 0);
            if (b == NULL) {
                out[t * N + n] = ya;
            } else {
                const float yb = row_value(b, g, q, n, t, buf + 2 * g->U, buf + 3 * g->U, t > 0);
                out[t * N + n] = silu(ya) * yb;
            }
        }
    }
    free(buf);
    return failed;
}


/* out[t, n] = sum_k W[n, k] x[t, k] for an N x K matrix of `bits`-bit codes (2, 3 or 4) in
 * groups of `group` columns with 8-bit meta (scale/zero codes per group; (step, min) float32
 * pairs per `mg` groups). q: low plane as u32 words [N][K/CU]; qhi: 3-bit high plane as u16
 * [N][K/CU] (else unused, may be NULL). threads <= 0: OpenMP's default.
 * Returns MP_UNSUPPORTED for a geometry this kernel does not handle (the caller falls back). */
int moepack_qgemv(const uint32_t *q, const uint16_t *qhi, const uint8_t *scale, const float *smeta,
                  const uint8_t *zero, const float *zmeta, int64_t mg, int mb, int bits, int64_t group, int64_t N,
                  int64_t K, const float *x, int64_t T, float *out, int threads) {
    const mp_mat m = {q, qhi, scale, zero, smeta, zmeta, mg, group, N, K, bits, mb};
    mp_geo g;
    mp_xq xq = {0};
    if (T <= 0 || geometry(&m, &g) != MP_OK || !all_finite(x, T * K)) return MP_UNSUPPORTED;
    if (xq_alloc(&g, T, &xq) != MP_OK) {
        xq_free(&xq);
        return MP_NOMEM;
    }
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : omp_get_max_threads()) reduction(| : failed)
#endif
    {
        xq_fill(&g, x, K, T, &xq);
        failed |= gemv_rows(&m, NULL, &g, &xq, T, out);
    }
    (void)threads;
    xq_free(&xq);
    return failed ? MP_NOMEM : MP_OK;
}

/* One expert from its record: h = silu(w1 x) * w3 x [T][I], then y = w2 h [T][H] unless y is
 * NULL (the hybrid engine's split stops at h, and may give w1 and w3 as their rows first..
 * alone: runtime.cpu_native.rows_descriptor). cpu_jobs.c runs it on its own thread. desc: 12 int64 per matrix (see matrix_at), for
 * w1, w3, w2. One parallel region for all of it: x is rounded once for w1 and w3, each row of
 * w1 and w3 is finished into h at once, and the team never leaves between the matrices. */
int moepack_expert(const uint8_t *record, const int64_t *desc, const float *x, int64_t T, float *h, float *y,
                   int threads) {
    const mp_mat m1 = matrix_at(record, desc), m3 = matrix_at(record, desc + 12), m2 = matrix_at(record, desc + 24);
    mp_geo g13, g2;
    /* without y, w2 is not read: w1 and w3 may then be row ranges (the split's CPU rows) */
    if (T <= 0 || geometry(&m1, &g13) != MP_OK || (y != NULL && geometry(&m2, &g2) != MP_OK)) return MP_UNSUPPORTED;
    if (m3.bits != m1.bits || m3.group != m1.group || m3.mg != m1.mg || m3.mb != m1.mb || m3.N != m1.N || m3.K != m1.K ||
        (y != NULL && m2.K != m1.N) || (m3.bits == 3 && m3.qhi == NULL))
        return MP_UNSUPPORTED;
    if (!all_finite(x, T * m1.K)) return MP_UNSUPPORTED;
    mp_xq x13 = {0}, x2 = {0};  /* zeroed: a failed first allocation skips the second, and both are freed */
    const int ok = xq_alloc(&g13, T, &x13) == MP_OK && (y == NULL || xq_alloc(&g2, T, &x2) == MP_OK);
    if (!ok) {
        xq_free(&x13);
        if (y != NULL) xq_free(&x2);
        return MP_NOMEM;
    }
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : omp_get_max_threads()) reduction(| : failed)
#endif
    {
        xq_fill(&g13, x, m1.K, T, &x13);
        failed |= gemv_rows(&m1, &m3, &g13, &x13, T, h);
        if (y != NULL) {
            xq_fill(&g2, h, m2.K, T, &x2);
            failed |= gemv_rows(&m2, NULL, &g2, &x2, T, y);
        }
    }
    (void)threads;
    xq_free(&x13);
    if (y != NULL) xq_free(&x2);
    return failed ? MP_NOMEM : MP_OK;
}

