/* What int8 activations would save in the CPU kernel's word loop: cycles per 128 weights of one
 * 2-bit g16 row with 4-bit meta codes (Mixtral's default expert format), two ways that differ
 * only in the integer dot of a word's 16 codes with x:
 *   int16  the shipped scheme (runtime/csrc/row_fast.h at 8 lanes): x as int16, a word's codes
 *          taken two at a time (one 16-bit shift each, telescoped, so no mask), 8 vpmaddwd + 7 adds;
 *   int8   llama.cpp's (Q8_K activations): x as int8, the codes four at a time per byte (shift and
 *          mask), 4 vpmaddubsw, 3 16-bit adds, one vpmaddwd by ones.
 * The meta decode and the float sums are the shipped ones in both. The values are random, so the
 * sums mean nothing; only the instruction stream is compared (docs/BENCHMARKS.md section 26).
 *
 *   cc -O3 -march=native tools/cpu_dot_probe.c -o /tmp/dot_probe && /tmp/dot_probe [ROWS [GHZ]]
 *
 * ROWS 2048 (default) keeps the codes in L2; 14336 reads them from L3 (18 MiB of codes and meta). GHZ turns time into cycles
 * (dev-cpu: 3.2, from a dependent-add loop). Needs AVX2 + FMA. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define AI static inline __attribute__((always_inline))

static double now(void) {
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    return a.tv_sec + a.tv_nsec * 1e-9;
}

/* the 8 nibble codes of groups i .. i+7 as int32 lanes (vec.h's v8_meta, 4-bit) */
AI __m256i meta(const uint8_t *codes, int64_t i) {
    int32_t eight;
    memcpy(&eight, codes + (i >> 1), 4);
    const __m256i top = _mm256_sllv_epi32(_mm256_set1_epi32(eight), _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
    return _mm256_srli_epi32(top, 28);
}

/* the scales of groups i .. i+7 (the shipped float form: code x step + min); adds their zero
 * term, -s z Xg, to acc */
AI __m256 block_meta(const uint8_t *sc, const uint8_t *zc, int64_t i, const float *xg, __m256 *acc) {
    const __m256 sb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(meta(sc, i)), _mm256_set1_ps(1.0f), _mm256_set1_ps(0.1f));
    const __m256 nz = _mm256_fmadd_ps(_mm256_cvtepi32_ps(meta(zc, i)), _mm256_set1_ps(-1.0f), _mm256_set1_ps(-0.2f));
    *acc = _mm256_fmadd_ps(_mm256_mul_ps(sb, nz), _mm256_loadu_ps(xg), *acc);
    return sb;
}

AI float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* one row of U words (one group each); x: per word, 8 pairs of 16 int16 (the shipped layout) */
__attribute__((noinline)) static float row_int16(const uint32_t *q, const uint8_t *sc, const uint8_t *zc, int64_t i0,
                                                 const int16_t *x, const float *d, const float *xg, int64_t U) {
    const __m256i low = _mm256_set1_epi32(0x00030003);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < U; g += 8) {
        const __m256 sb = block_meta(sc, zc, i0 + g, xg + g, &acc);
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + g));
        const __m256i *xp = (const __m256i *)(x + g * 16);
        __m256i d0 = _mm256_madd_epi16(_mm256_and_si256(w, low), _mm256_loadu_si256(xp));
        __m256i d1 = _mm256_madd_epi16(_mm256_srli_epi16(w, 2), _mm256_loadu_si256(xp + 1));
        for (int p = 2; p < 8; p += 2) {
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(_mm256_srli_epi16(w, 2 * p), _mm256_loadu_si256(xp + p)));
            d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(_mm256_srli_epi16(w, 2 * p + 2), _mm256_loadu_si256(xp + p + 1)));
        }
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)), _mm256_loadu_ps(d + g));
        acc = _mm256_fmadd_ps(sb, f, acc);
    }
    return hsum(acc);
}

/* the same row with x as int8: byte b of a word holds codes 4b .. 4b+3; pass k takes code 4b+k */
__attribute__((noinline)) static float row_int8(const uint32_t *q, const uint8_t *sc, const uint8_t *zc, int64_t i0,
                                                const int8_t *x, const float *d, const float *xg, int64_t U) {
    const __m256i low = _mm256_set1_epi32(0x03030303), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < U; g += 8) {
        const __m256 sb = block_meta(sc, zc, i0 + g, xg + g, &acc);
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + g));
        const __m256i *xp = (const __m256i *)(x + g * 16);
        /* |sum| <= 4 passes x 2 products x 3 x 127 = 3048: the 16-bit adds cannot overflow */
        __m256i a = _mm256_maddubs_epi16(_mm256_and_si256(w, low), _mm256_loadu_si256(xp));
        __m256i b = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(w, 2), low), _mm256_loadu_si256(xp + 1));
        a = _mm256_add_epi16(a, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(w, 4), low), _mm256_loadu_si256(xp + 2)));
        b = _mm256_add_epi16(b, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(w, 6), low), _mm256_loadu_si256(xp + 3)));
        const __m256i dot = _mm256_madd_epi16(_mm256_add_epi16(a, b), ones);
        acc = _mm256_fmadd_ps(sb, _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(d + g)), acc);
    }
    return hsum(acc);
}

int main(int argc, char **argv) {
    const int64_t N = argc > 1 ? atoi(argv[1]) : 2048, K = 4096, U = K / 16;
    const double ghz = argc > 2 ? atof(argv[2]) : 3.2;
    uint32_t *q = malloc(N * U * 4);
    uint8_t *sc = malloc(N * U / 2 + 8), *zc = malloc(N * U / 2 + 8);
    int16_t *x16 = aligned_alloc(64, K * 2);
    int8_t *x8 = aligned_alloc(64, K);
    float *d = malloc(U * 4), *xg = malloc(U * 4), *out = malloc(N * 4);
    srand(1);
    for (int64_t i = 0; i < N * U; i++) q[i] = (uint32_t)rand() * 2654435761u;
    for (int64_t i = 0; i < N * U / 2 + 8; i++) sc[i] = (uint8_t)rand(), zc[i] = (uint8_t)rand();
    for (int64_t i = 0; i < K; i++) x16[i] = (int16_t)(rand() % 65535 - 32767), x8[i] = (int8_t)(rand() % 255 - 127);
    for (int64_t i = 0; i < U; i++) d[i] = 1e-3f, xg[i] = 0.1f;
    const double blocks = N * K / 128.0;
    for (int rep = 0; rep < 3; rep++) {
        double b16 = 1e9, b8 = 1e9;
        for (int it = 0; it < 7; it++) {  /* alternated, best of 7 each */
            double t = now();
            for (int64_t r = 0; r < N; r++) out[r] = row_int16(q + r * U, sc, zc, r * U, x16, d, xg, U);
            t = now() - t;
            b16 = t < b16 ? t : b16;
            t = now();
            for (int64_t r = 0; r < N; r++) out[r] += row_int8(q + r * U, sc, zc, r * U, x8, d, xg, U);
            t = now() - t;
            b8 = t < b8 ? t : b8;
        }
        printf("%ld x %ld, 2-bit g16, 4-bit meta: int16 %.1f, int8 %.1f cycles per 128 weights at %.2f GHz (%g)\n",
               (long)N, (long)K, b16 * ghz * 1e9 / blocks, b8 * ghz * 1e9 / blocks, ghz, (double)out[N - 1]);
    }
    return 0;
}
