/* moe-pack CPU kernel: one decode step (one token) in one call, from the embedding to the logits.
 *
 * Why: on the CPU a decode layer was ~45 torch ops (norms, rotary, the cache write, attention,
 * routing, residual adds) around its four GEMV calls, each op and each ctypes call costing
 * microseconds of host time: 0.6 ms per layer on dev-cpu, more than the arithmetic of a small
 * model's layer, and on the GPU host (slower per op) tens of ms per token of a CPU-only
 * Mixtral. Here the whole stack of layers is one C loop over the existing GEMVs
 * (moepack_qgemv, moepack_expert, moepack_gemv_f16) and a few plain loops for the rest, the
 * arithmetic of runtime/{rmsnorm,rope,attention,moe,experts}.py in float32. Built into the
 * same library as qgemv_cpu.c; runtime/cpu_step.py fills the structs below once per model. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MP_DOT8 1
#endif
#include "packed.h"

int moepack_qgemv(const uint32_t *q, const uint16_t *qhi, const uint8_t *scale, const float *smeta,
                  const uint8_t *zero, const float *zmeta, int64_t mg, int mb, int bits, int64_t group, int64_t N,
                  int64_t K, const float *x, int64_t T, float *out, int threads);
int moepack_expert(const uint8_t *record, const int64_t *desc, const float *x, int64_t T, float *h, float *y,
                   int threads);
int moepack_gemv_f16(const uint16_t *w, const float *x, int64_t N, int64_t K, int64_t T, float *out, int threads);

/* One linear layer y = W x. kind: 0 none, 1 packed (desc: matrix_at's 12 numbers, offsets
 * from w), 2 float32 [N][K], 3 float16 [N][K]. Every field 8 bytes: runtime/cpu_step.py's
 * ctypes mirror has no padding to get wrong. */
typedef struct {
    int64_t kind, N, K;
    const void *w;
    const int64_t *desc;
} mp_lin;

typedef struct {
    const float *in_norm, *post_norm; /* [H] */
    mp_lin qkv[3];                    /* q, k, v; or q|k|v stacked in qkv[0] (qkv[1].kind == 0) */
    mp_lin o;
    const float *router;              /* [E][H] */
    float *kv;                        /* the layer's cache [2][G][ctx][D] */
    const uint8_t *const *experts;    /* E record addresses */
    int64_t window;                   /* sliding window; 0: none */
} mp_dlayer;

typedef struct {
    int64_t layers, H, heads, G, D, E, k, ctx, inter;
    double eps;
    const float *cos, *sin;    /* [ctx][D]; sin with its first half negated (runtime/rope.py) */
    const int64_t *expert_desc; /* 36 numbers: w1, w3, w2 (runtime.cpu_native.expert_descriptor) */
    const mp_dlayer *layer;
    float *work;                /* moepack_decode_work(m) floats */
    const float *final_norm;    /* [H] */
    mp_lin lm_head;             /* kind 0: the caller applies it */
    double *times;              /* MP_PHASES seconds each step adds to (below); NULL: none */
} mp_dmodel;

/* Where a step's time goes, so a slow model can be told from a slow kernel (a 32-layer CPU
 * decode once ran ~10% over the sum of its benchmarked parts; these phases showed why). Five
 * clock reads per layer cost ~0.1 us against a layer's milliseconds. */
enum { MP_ATTN_IN, MP_ATTEND, MP_ATTN_OUT, MP_ROUTE, MP_EXPERTS, MP_HEAD, MP_PHASES };

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Adds the time since *t to phase i of m's times, and moves *t to now. */
static void lap(const mp_dmodel *m, int i, double *t) {
    if (!m->times) return;
    const double t1 = seconds();
    m->times[i] += t1 - *t;
    *t = t1;
}

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    int64_t i = 0;
#ifdef MP_DOT8
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    const __m256 s8 = _mm256_add_ps(a0, a1);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Parallel only where a region pays for itself (a region costs microseconds; a 576 x 576
 * matrix takes about that much on one core). */
#define MP_PAR_WORK (1 << 18)

static int linear(const mp_lin *l, const float *x, float *y, int threads) {
    if (l->kind == 1) {
        const mp_mat m = matrix_at((const uint8_t *)l->w, l->desc);
        return moepack_qgemv(m.q, m.qhi, m.scale, m.smeta, m.zero, m.zmeta, m.mg, m.mb, m.bits, m.group, m.N, m.K, x,
                             1, y, threads);
    }
    if (l->kind == 3) return moepack_gemv_f16((const uint16_t *)l->w, x, l->N, l->K, 1, y, threads);
    if (l->kind != 2) return MP_UNSUPPORTED;
    const float *w = (const float *)l->w;
    const int64_t N = l->N, K = l->K;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads()) if (N * K >= MP_PAR_WORK)
#endif
    for (int64_t n = 0; n < N; n++) y[n] = dot(w + n * K, x, K);
    (void)threads;
    return MP_OK;
}

/* runtime/rmsnorm.py: weight * (x * rsqrt(mean(x^2) + eps)) */
static void rms_norm(const float *x, const float *w, int64_t n, double eps, float *out) {
    const float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* runtime/rope.py for one head at one position: x * cos + roll(x, D/2) * sin_signed. */
static void rotate(float *x, const float *c, const float *s, int64_t D, float *tmp) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) tmp[i] = x[i] * c[i] + x[(i + half) % D] * s[i];
    memcpy(x, tmp, sizeof(float) * (size_t)D);
}

/* One token's attention for the R query heads q [R][D] of one kv head over cache positions
 * lo..pos: softmax(q k / sqrt(D)) v per head, in float32 (SDPA's default scale). Each key and
 * value row is read once for all R heads (GQA: Mixtral's 4 query heads per kv head read the
 * same rows), so a long context streams the cache once. p: [R][ctx] scratch. */
static void attend(const float *q, int64_t R, const float *keys, const float *values, int64_t lo, int64_t pos,
                   int64_t D, int64_t ctx, float *p, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    for (int64_t s = lo; s <= pos; s++)
        for (int64_t r = 0; r < R; r++) p[r * ctx + s] = dot(q + r * D, keys + s * D, D) * scale;
    for (int64_t r = 0; r < R; r++) {
        float *pr = p + r * ctx, mx = -INFINITY, sum = 0.0f;
        for (int64_t s = lo; s <= pos; s++) mx = pr[s] > mx ? pr[s] : mx;
        for (int64_t s = lo; s <= pos; s++) sum += pr[s] = expf(pr[s] - mx);
        for (int64_t s = lo; s <= pos; s++) pr[s] /= sum;
    }
    for (int64_t i = 0; i < R * D; i++) out[i] = 0.0f;
    for (int64_t s = lo; s <= pos; s++) {
        const float *v = values + s * D;
        for (int64_t r = 0; r < R; r++) {
            const float a = p[r * ctx + s];
            float *o = out + r * D;
            for (int64_t i = 0; i < D; i++) o[i] += a * v[i];
        }
    }
}

/* runtime/moe.py's route: softmax over the E logits, the top k (ties: the lower expert), their
 * probabilities renormalised to sum to 1. */
static void route(const float *logits, int64_t E, int64_t k, int64_t *idx, float *w) {
    float mx = -INFINITY, sum = 0.0f, top = 0.0f;
    float p[256];
    for (int64_t e = 0; e < E; e++) mx = logits[e] > mx ? logits[e] : mx;
    for (int64_t e = 0; e < E; e++) sum += p[e] = expf(logits[e] - mx);
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= idx[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        idx[j] = best;
        w[j] = p[best];
        top += p[best];
    }
    for (int64_t j = 0; j < k; j++) w[j] /= top;
}

/* Floats of scratch moepack_decode_step needs for m. */
int64_t moepack_decode_work(const mp_dmodel *m) {
    const int64_t qkv = (m->heads + 2 * m->G) * m->D;
    return 4 * m->H + qkv + m->heads * m->D + m->heads * m->ctx + m->D * m->heads + m->E + m->inter;
}

/* One token at position pos through layers 0..layers-1 and the final norm: h [H] (the
 * embedding) becomes the normed last hidden state, and with an lm_head (kind != 0) logits [V]
 * get its product; each layer's k and v are written to its cache at pos; chosen [layers][k]
 * gets the experts each layer used. Returns MP_OK, or the first GEMV's refusal (a non-finite
 * activation, a layout it does not take): the caller then runs the step in torch, which
 * writes the same cache positions again. */
int moepack_decode_step(const mp_dmodel *m, float *h, int64_t pos, int64_t *chosen, float *logits, int threads) {
    const int64_t H = m->H, D = m->D, G = m->G, R = m->heads / m->G, ctx = m->ctx;
    if (pos < 0 || pos >= ctx || m->E > 256 || m->k > m->E || D % 2) return MP_UNSUPPORTED;
    float *x = m->work, *acc = x + H, *y = acc + H, *o = y + H, *qkv = o + H;
    float *att = qkv + (m->heads + 2 * G) * D, *p = att + m->heads * D, *tmp = p + m->heads * ctx;
    float *rlogits = tmp + D * m->heads, *hid = rlogits + m->E;
    const float *cos_row = m->cos + pos * D, *sin_row = m->sin + pos * D;
    double t = m->times ? seconds() : 0.0;
    for (int64_t L = 0; L < m->layers; L++) {
        const mp_dlayer *ly = m->layer + L;
        int rc = MP_OK;
        rms_norm(h, ly->in_norm, H, m->eps, x);
        rc = linear(&ly->qkv[0], x, qkv, threads);  /* q|k|v stacked, or q alone */
        if (rc == MP_OK && ly->qkv[1].kind != 0) rc = linear(&ly->qkv[1], x, qkv + m->heads * D, threads);
        if (rc == MP_OK && ly->qkv[2].kind != 0) rc = linear(&ly->qkv[2], x, qkv + (m->heads + G) * D, threads);
        if (rc != MP_OK) return rc;
        lap(m, MP_ATTN_IN, &t);
        for (int64_t hd = 0; hd < m->heads + G; hd++) rotate(qkv + hd * D, cos_row, sin_row, D, tmp);
        float *kc = ly->kv, *vc = ly->kv + G * ctx * D;
        for (int64_t g = 0; g < G; g++) {
            memcpy(kc + (g * ctx + pos) * D, qkv + (m->heads + g) * D, sizeof(float) * (size_t)D);
            memcpy(vc + (g * ctx + pos) * D, qkv + (m->heads + G + g) * D, sizeof(float) * (size_t)D);
        }
        const int64_t lo = ly->window > 0 && pos >= ly->window ? pos - ly->window + 1 : 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads()) \
    if ((pos - lo + 1) * m->heads * D >= MP_PAR_WORK)
#endif
        for (int64_t g = 0; g < G; g++)  /* query heads g R .. g R + R - 1 read kv head g */
            attend(qkv + g * R * D, R, kc + g * ctx * D, vc + g * ctx * D, lo, pos, D, ctx, p + g * R * ctx,
                   att + g * R * D);
        lap(m, MP_ATTEND, &t);
        if ((rc = linear(&ly->o, att, o, threads)) != MP_OK) return rc;
        for (int64_t i = 0; i < H; i++) h[i] += o[i];
        lap(m, MP_ATTN_OUT, &t);
        rms_norm(h, ly->post_norm, H, m->eps, x);
        for (int64_t e = 0; e < m->E; e++) rlogits[e] = dot(ly->router + e * H, x, H);
        int64_t *idx = chosen + L * m->k;
        float w[256];
        route(rlogits, m->E, m->k, idx, w);
        lap(m, MP_ROUTE, &t);
        for (int64_t j = 0; j < m->k; j++) {
            if ((rc = moepack_expert(ly->experts[idx[j]], m->expert_desc, x, 1, hid, y, threads)) != MP_OK) return rc;
            for (int64_t i = 0; i < H; i++) acc[i] = j == 0 ? y[i] * w[j] : acc[i] + y[i] * w[j];
        }
        for (int64_t i = 0; i < H; i++) h[i] += acc[i];
        lap(m, MP_EXPERTS, &t);
    }
    rms_norm(h, m->final_norm, H, m->eps, x);
    memcpy(h, x, sizeof(float) * (size_t)H);
    const int rc = m->lm_head.kind != 0 ? linear(&m->lm_head, h, logits, threads) : MP_OK;
    lap(m, MP_HEAD, &t);
    return rc;
}
