/* Cycles per 128 weights of runtime/csrc/qgemv_cpu.c on one core, for one Mixtral-shape
 * matrix (N x 4096, random codes): the figure docs/BENCHMARKS.md section 7 quotes.
 *
 *   cc -O3 -march=native -fopenmp tools/cpu_kernel_cycles.c -o /tmp/cyc -lm
 *   /tmp/cyc BITS GROUP [ROWS [GHZ [META_BITS [WIDE [TOKENS [COLS [ACT8]]]]]]]   # e.g. /tmp/cyc 2 16; /tmp/cyc 2 16 14336 3.34 4
 *
 * GHZ is the core clock used to turn time into cycles (dev-cpu: 3.34, from a dependent-add
 * loop); ROWS 2048 keeps the matrix in cache, 14336 (default) streams it from memory. WIDE 0
 * keeps an AVX-512 build (or one with -DMP_EMULATE_WIDE) to its 8-lane rows. TOKENS (default 1):
 * x of that many tokens at once (a prompt's experts); the figure is then per 128 weights and token.
 * COLS (default 4096): the row width, e.g. 14336 for w2 (4096 ROWS). ACT8 1: int8 activations
 * (moepack_set_act8). */
#include "../runtime/csrc/qgemv_cpu.c"  /* the kernel itself, flags as runtime/cpu_build.py builds it */
#include "../runtime/csrc/prompt_cpu.c"  /* its multi-token rows, files of their own for a parallel build */
#include "../runtime/csrc/prompt2_cpu.c"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    return a.tv_sec + a.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const int bits = argc > 1 ? atoi(argv[1]) : 2;
    const int64_t group = argc > 2 ? atoi(argv[2]) : 16, N = argc > 3 ? atoi(argv[3]) : 14336, mg = 128;
    const int64_t K = argc > 8 ? atoi(argv[8]) : 4096;
    const double ghz = argc > 4 ? atof(argv[4]) : 3.34;
    const int mb = argc > 5 ? atoi(argv[5]) : 8;  /* 4: scale/zero codes as nibbles (random bytes either way) */
    const int wide = moepack_set_wide(argc > 6 ? atoi(argv[6]) : 1);
    const int64_t T = argc > 7 ? atoi(argv[7]) : 1;
    const int act8 = moepack_set_act8(argc > 9 ? atoi(argv[9]) : 0);
    const int cu = bits == 4 ? 8 : 16;
    const int64_t U = K / cu, gpr = K / group, M = (N * gpr + mg - 1) / mg;
    uint32_t *q = malloc(N * U * 4);
    uint16_t *qh = malloc(N * U * 2);
    uint8_t *sc = malloc(N * gpr), *zc = malloc(N * gpr);
    float *sm = malloc(M * 8), *zm = malloc(M * 8), *x = malloc(T * K * 4), *out = malloc(T * N * 4);
    srand(1);
    for (int64_t i = 0; i < N * U; i++) {
        q[i] = (uint32_t)rand() * 2654435761u;
        qh[i] = (uint16_t)rand();
    }
    for (int64_t i = 0; i < N * gpr; i++) {
        sc[i] = (uint8_t)rand();
        zc[i] = (uint8_t)rand();
    }
    for (int64_t i = 0; i < M; i++) {
        sm[2 * i] = 0.04f / 255;
        sm[2 * i + 1] = 0.01f;
        zm[2 * i] = 3.0f / 255;
        zm[2 * i + 1] = 0;
    }
    for (int64_t i = 0; i < T * K; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    double best = 1e9;
    for (int r = 0; r < 9; r++) {
        const double t = now();
        if (moepack_qgemv(q, qh, sc, sm, zc, zm, mg, mb, bits, group, N, K, x, T, out, 1) != 0) return 1;
        const double dt = now() - t;
        if (dt < best) best = dt;
    }
    printf("%d-bit g%ld, %d-bit meta, %ld x %ld, %d lanes, %ld tokens, %s activations, 1 thread: %.3f ms, %.1f cycles per 128 weights "
           "and token at %.2f GHz\n", bits, (long)group, mb, (long)N, (long)K, wide ? 16 : 8, (long)T, act8 ? "int8" : "int16", best * 1e3,
           best * ghz * 1e9 / (N * K / 128.0) / T, ghz);
    return 0;
}
