/* ggml_expert_bench.c: one Mixtral-8x7B expert FFN on ggml's CPU backend, as llama.cpp computes it.
 *
 * Measures, per (weight type, threads), the wall time of one call of
 *     y = w2 @ (silu(w1 @ x) * (w3 @ x))      w1, w3: [14336 out, 4096 in], w2: [4096 out, 14336 in]
 * on T tokens (default 1: decode) through a ggml graph (ggml_mul_mat x3 + ggml_swiglu_split, or with
 * --mode mmid ggml_mul_mat_id on experts stacked, as llama.cpp's build_moe_ffn does) computed by the
 * CPU backend (ggml_backend_graph_compute) with N threads. Weights are in a ggml quant type (--type
 * q2_K,q3_K,q4_K, ... any ggml type name; --down TYPE gives w2 another, e.g. q3_K as llama.cpp's Q2_K
 * files have: src/llama-quant.cpp puts ffn_down in Q3_K for LLAMA_FTYPE_MOSTLY_Q2_K). Activations are
 * f32, which ggml quantizes to the type's vec_dot_type (Q8_K for the k-quants) inside every mul_mat,
 * so that cost is in the timing.
 * Weights: random Gaussian floats quantized once with ggml_quantize_chunk, then copied into enough
 * expert copies to total >= --pool-mib MiB (default 1024); the timed calls rotate over the copies, so no
 * call finds its weights in the last-level cache (decode from DRAM). --repack puts the weights in
 * ggml's CPU_REPACK buffer where ggml has an interleaved layout for the type on this CPU (llama.cpp's
 * default load path: on AVX2 that is Q4_K -> Q4_Kx8; Q2_K only with AVX-512; Q3_K never).
 * Reports the median and min ms per expert call over --runs calls (after one warm-up pass over the
 * pool) and the effective GB/s = the expert's weight bytes / time. --check compares y with a float64
 * reference on the dequantized weights. --json FILE writes the rows.
 *
 * Build (LL = llama.cpp source dir, B = its cmake build dir with the ggml, ggml-base, ggml-cpu targets
 * built static; GGML_NATIVE=ON, OpenMP on):
 *   gcc -O2 -march=native -fopenmp -I$LL/ggml/include tools/ggml_expert_bench.c -o /tmp/ggml_expert_bench \
 *       $B/ggml/src/libggml.a $B/ggml/src/libggml-cpu.a $B/ggml/src/libggml-base.a -lstdc++ -lm -lpthread
 * Run:
 *   /tmp/ggml_expert_bench --type q2_K,q3_K,q4_K --threads 1,2 --runs 20 --repack [--tokens 1] [--pool-mib 1024]
 *   /tmp/ggml_expert_bench --type q2_K --down q3_K --threads 1,2 --runs 20     # a shipped Q2_K file's expert
 * Timings: clock_gettime around ggml_backend_graph_compute only (x stays set; quantizing x to Q8_K is
 * inside the graph). The llama.cpp tree used first: llama-cpp-python 0.3.36's vendor/llama.cpp
 * (ggml 0.25.3); configure the top-level llama.cpp dir (the sdist lacks ggml/ggml.pc.in, which a
 * standalone ggml configure needs) and build only: cmake --build B --target ggml ggml-base ggml-cpu -j2
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static int HIDDEN = 4096, INTER = 14336;  /* Mixtral-8x7B; --hidden/--inter for cache-resident checks */
#define MAXL 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Box-Muller on a xorshift64* stream: deterministic, no libc rand state */
static uint64_t rng_s = 0x9E3779B97F4A7C15ull;
static double urand(void) {
    rng_s ^= rng_s >> 12; rng_s ^= rng_s << 25; rng_s ^= rng_s >> 27;
    return ((rng_s * 2685821657736338717ull) >> 11) * (1.0 / 9007199254740992.0);
}
static void gauss_fill(float *p, size_t n, float sd) {
    for (size_t i = 0; i < n; i += 2) {
        double u = urand() + 1e-300, v = urand(), r = sqrt(-2 * log(u));
        p[i] = (float)(sd * r * cos(2 * M_PI * v));
        if (i + 1 < n) p[i + 1] = (float)(sd * r * sin(2 * M_PI * v));
    }
}

static int split_list(char *s, char **out) {
    int n = 0;
    for (char *t = strtok(s, ","); t && n < MAXL; t = strtok(NULL, ",")) out[n++] = t;
    return n;
}

static enum ggml_type parse_type(const char *name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *tn = ggml_type_name((enum ggml_type)t);
        if (tn && strcasecmp(tn, name) == 0 && ggml_blck_size((enum ggml_type)t) > 0) return (enum ggml_type)t;
    }
    fprintf(stderr, "unknown ggml type %s\n", name);
    exit(2);
}

static ggml_backend_buffer_type_t repack_buft(void) {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    ggml_backend_dev_get_extra_bufts_t fn =
        (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!fn) return NULL;
    for (ggml_backend_buffer_type_t *b = fn(dev); b && *b; b++)
        if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    return NULL;
}

/* y[o] = sum_i w[o, i] x[i] for the dequantized rows of a quantized matrix, in double */
static void ref_gemv(enum ggml_type type, const void *q, int rows, int cols, const double *x, double *y) {
    const struct ggml_type_traits *tr = ggml_get_type_traits(type);
    size_t rs = ggml_row_size(type, cols);
    float *row = malloc(sizeof(float) * cols);
    for (int o = 0; o < rows; o++) {
        tr->to_float((const char *)q + (size_t)o * rs, row, cols);
        double s = 0;
        for (int i = 0; i < cols; i++) s += row[i] * x[i];
        y[o] = s;
    }
    free(row);
}

typedef struct {
    char type[32]; double bpw; size_t bytes; int copies, tokens, threads, runs;
    const char *mode; int repacked; double med_ms, min_ms, max_ms, gbs_med, gbs_max, check;
} row_t;

int main(int argc, char **argv) {
    char types_s[256] = "q2_K,q3_K,q4_K", threads_s[64] = "1,2";
    int tokens = 1, runs = 20, pool_mib = 1024, repack = 0, check = 0, mmid = 0;
    const char *json = NULL, *down_s = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--type") && v) { snprintf(types_s, sizeof types_s, "%s", v); i++; }
        else if (!strcmp(a, "--threads") && v) { snprintf(threads_s, sizeof threads_s, "%s", v); i++; }
        else if (!strcmp(a, "--tokens") && v) { tokens = atoi(v); i++; }
        else if (!strcmp(a, "--runs") && v) { runs = atoi(v); i++; }
        else if (!strcmp(a, "--pool-mib") && v) { pool_mib = atoi(v); i++; }
        else if (!strcmp(a, "--mode") && v) { mmid = !strcmp(v, "mmid"); i++; }
        else if (!strcmp(a, "--json") && v) { json = v; i++; }
        else if (!strcmp(a, "--down") && v) { down_s = v; i++; }
        else if (!strcmp(a, "--hidden") && v) { HIDDEN = atoi(v); i++; }
        else if (!strcmp(a, "--inter") && v) { INTER = atoi(v); i++; }
        else if (!strcmp(a, "--repack")) repack = 1;
        else if (!strcmp(a, "--check")) check = 1;
        else {
            fprintf(stderr, "usage: %s [--type q2_K,q3_K,q4_K] [--threads 1,2] [--tokens 1] [--runs 20] "
                            "[--pool-mib 1024] [--mode mm|mmid] [--repack] [--check] [--json FILE] [--hidden 4096 --inter 14336] "
                            "[--down TYPE: w2's type, e.g. q3_K as llama.cpp's Q2_K files have]\n", argv[0]);
            return 2;
        }
    }
    if (tokens < 1 || runs < 1) { fprintf(stderr, "--tokens and --runs must be >= 1\n"); return 2; }
    if (HIDDEN < 256 || INTER < 256 || HIDDEN % 256 || INTER % 256) { fprintf(stderr, "--hidden/--inter: multiples of 256\n"); return 2; }
    char *types[MAXL], *thr[MAXL];
    int ntypes = split_list(types_s, types), nthr = split_list(threads_s, thr);

    ggml_cpu_init();
    ggml_backend_t be = ggml_backend_cpu_init();
    printf("ggml CPU backend: AVX2 %d FMA %d F16C %d AVX512 %d AVX512_VNNI %d AVX_VNNI %d llamafile %d; "
           "%d tokens; mode %s; pool >= %d MiB; hidden %d inter %d\n", ggml_cpu_has_avx2(), ggml_cpu_has_fma(), ggml_cpu_has_f16c(),
           ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vnni(), ggml_cpu_has_avx_vnni(), ggml_cpu_has_llamafile(),
           tokens, mmid ? "mul_mat_id" : "mul_mat", pool_mib, HIDDEN, INTER);
    printf("%-11s %5s %10s %6s %6s %3s %7s %8s %8s %8s %7s %7s %9s\n", "type", "bpw", "bytes", "repack", "copies",
           "T", "threads", "med ms", "min ms", "max ms", "GB/s md", "GB/s mx", "check");

    row_t rows[MAXL * MAXL];
    int nrows = 0;
    for (int ti = 0; ti < ntypes; ti++) {
        enum ggml_type type = parse_type(types[ti]), dtype = down_s ? parse_type(down_s) : type;
        size_t b13 = ggml_row_size(type, HIDDEN) * INTER, b2 = ggml_row_size(dtype, INTER) * HIDDEN;
        size_t bytes = 2 * b13 + b2;
        double bpw = 8.0 * bytes / (3.0 * HIDDEN * INTER);
        int copies = (int)(((size_t)pool_mib << 20) / bytes) + 1;
        if (copies < 2) copies = 2;

        /* quantize one w1-shaped and one w2-shaped matrix (w3 reuses w1's bytes: timing is value-blind) */
        float *f = malloc(sizeof(float) * (size_t)HIDDEN * INTER);
        void *q13 = malloc(b13), *q2 = malloc(b2);
        gauss_fill(f, (size_t)HIDDEN * INTER, 0.02f);
        ggml_quantize_chunk(type, f, q13, 0, INTER, HIDDEN, NULL);
        gauss_fill(f, (size_t)HIDDEN * INTER, 0.02f);
        ggml_quantize_chunk(dtype, f, q2, 0, HIDDEN, INTER, NULL);
        free(f);

        /* weights: copies x {w1, w3, w2}, or (mmid) three tensors with the copies stacked as experts */
        struct ggml_init_params wp = {ggml_tensor_overhead() * (3 * copies + 8), NULL, true};
        struct ggml_context *wctx = ggml_init(wp);
        int nt = mmid ? 1 : copies;
        struct ggml_tensor **w1 = calloc(nt, sizeof *w1), **w3 = calloc(nt, sizeof *w3), **w2 = calloc(nt, sizeof *w2);
        for (int c = 0; c < nt; c++) {
            int ne2 = mmid ? copies : 1;
            w1[c] = ggml_new_tensor_3d(wctx, type, HIDDEN, INTER, ne2);
            w3[c] = ggml_new_tensor_3d(wctx, type, HIDDEN, INTER, ne2);
            w2[c] = ggml_new_tensor_3d(wctx, dtype, INTER, HIDDEN, ne2);
        }
        ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
        ggml_backend_buffer_type_t rb = repack ? repack_buft() : NULL;
        int repacked = 0;
        ggml_backend_buffer_t wbuf = NULL;
        if (rb) {
            wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, rb);
            if (w1[0]->extra) repacked = 1;
            else { /* no interleaved layout for this type on this CPU: llama.cpp keeps it in the plain buffer */
                ggml_backend_buffer_free(wbuf);
                ggml_free(wctx);
                wctx = ggml_init(wp);
                for (int c = 0; c < nt; c++) {
                    int ne2 = mmid ? copies : 1;
                    w1[c] = ggml_new_tensor_3d(wctx, type, HIDDEN, INTER, ne2);
                    w3[c] = ggml_new_tensor_3d(wctx, type, HIDDEN, INTER, ne2);
                    w2[c] = ggml_new_tensor_3d(wctx, dtype, INTER, HIDDEN, ne2);
                }
                wbuf = NULL;
            }
        }
        if (!wbuf) wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
        if (!wbuf) { fprintf(stderr, "weight allocation failed (%d copies)\n", copies); return 1; }
        ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        if (mmid && !repacked) { /* plain buffer: per-expert slices can be copied piecewise */
            for (int c = 0; c < copies; c++) {
                ggml_backend_tensor_set(w1[0], q13, (size_t)c * b13, b13);
                ggml_backend_tensor_set(w3[0], q13, (size_t)c * b13, b13);
                ggml_backend_tensor_set(w2[0], q2, (size_t)c * b2, b2);
            }
        } else if (mmid) { /* the repack buffer takes whole tensors */
            char *s13 = malloc(b13 * copies), *s2 = malloc(b2 * copies);
            for (int c = 0; c < copies; c++) { memcpy(s13 + c * b13, q13, b13); memcpy(s2 + c * b2, q2, b2); }
            ggml_backend_tensor_set(w1[0], s13, 0, b13 * copies);
            ggml_backend_tensor_set(w3[0], s13, 0, b13 * copies);
            ggml_backend_tensor_set(w2[0], s2, 0, b2 * copies);
            free(s13); free(s2);
        } else {
            for (int c = 0; c < copies; c++) {
                ggml_backend_tensor_set(w1[c], q13, 0, b13);
                ggml_backend_tensor_set(w3[c], q13, 0, b13);
                ggml_backend_tensor_set(w2[c], q2, 0, b2);
            }
        }

        /* the graph: built once on copy 0; a call on copy c re-points the three weight tensors' data */
        size_t act = sizeof(float) * (size_t)tokens * (3 * INTER + 2 * HIDDEN) + 4096;
        struct ggml_init_params cp = {ggml_tensor_overhead() * 16 + ggml_graph_overhead() + act + (1 << 20), NULL, false};
        struct ggml_context *cctx = ggml_init(cp);
        struct ggml_tensor *x = ggml_new_tensor_2d(cctx, GGML_TYPE_F32, HIDDEN, tokens), *ids = NULL, *y;
        gauss_fill((float *)x->data, (size_t)HIDDEN * tokens, 1.0f);
        if (mmid) { /* llama.cpp's build_moe_ffn: x as [H, 1, T], ids [n_used=1, T] */
            struct ggml_tensor *x3 = ggml_reshape_3d(cctx, x, HIDDEN, 1, tokens);
            ids = ggml_new_tensor_2d(cctx, GGML_TYPE_I32, 1, tokens);
            struct ggml_tensor *up = ggml_mul_mat_id(cctx, w3[0], x3, ids);
            struct ggml_tensor *gate = ggml_mul_mat_id(cctx, w1[0], x3, ids);
            struct ggml_tensor *h = ggml_swiglu_split(cctx, gate, up);
            y = ggml_mul_mat_id(cctx, w2[0], h, ids);
        } else {
            struct ggml_tensor *up = ggml_mul_mat(cctx, w3[0], x);
            struct ggml_tensor *gate = ggml_mul_mat(cctx, w1[0], x);
            struct ggml_tensor *h = ggml_swiglu_split(cctx, gate, up);
            y = ggml_mul_mat(cctx, w2[0], h);
        }
        struct ggml_cgraph *gf = ggml_new_graph(cctx);
        ggml_build_forward_expand(gf, y);
        void *d1 = w1[0]->data, *d3 = w3[0]->data, *d2 = w2[0]->data;
        #define SELECT(c) do { \
            if (mmid) { for (int t_ = 0; t_ < tokens; t_++) ((int32_t *)ids->data)[t_] = (c); } \
            else { w1[0]->data = w1[c]->data; w3[0]->data = w3[c]->data; w2[0]->data = w2[c]->data; } } while (0)

        double err = NAN;
        if (check) { /* token 0 on copy 0 against float64 on the dequantized weights */
            SELECT(0);
            ggml_backend_cpu_set_n_threads(be, atoi(thr[0]));
            ggml_backend_graph_compute(be, gf);
            double *xd = malloc(sizeof(double) * INTER), *g = malloc(sizeof(double) * INTER),
                   *u = malloc(sizeof(double) * INTER), *yr = malloc(sizeof(double) * HIDDEN);
            for (int i = 0; i < HIDDEN; i++) xd[i] = ((float *)x->data)[i];
            ref_gemv(type, q13, INTER, HIDDEN, xd, g);
            ref_gemv(type, q13, INTER, HIDDEN, xd, u);
            for (int i = 0; i < INTER; i++) g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_gemv(dtype, q2, HIDDEN, INTER, g, yr);
            double num = 0, den = 0;
            for (int i = 0; i < HIDDEN; i++) {
                double d = ((float *)y->data)[i] - yr[i];
                num += d * d; den += yr[i] * yr[i];
            }
            err = sqrt(num / den);
            free(xd); free(g); free(u); free(yr);
        }

        char tname[32];
        snprintf(tname, sizeof tname, "%s%s%s", ggml_type_name(type), dtype != type ? "/" : "", dtype != type ? ggml_type_name(dtype) : "");
        double *ts = malloc(sizeof(double) * runs);
        for (int hi = 0; hi < nthr; hi++) {
            int nth = atoi(thr[hi]);
            ggml_backend_cpu_set_n_threads(be, nth);
            int call = 0;
            for (int w = 0; w < copies; w++, call++) { SELECT(call % copies); ggml_backend_graph_compute(be, gf); }
            for (int r = 0; r < runs; r++, call++) {
                SELECT(call % copies);
                double t0 = now_s();
                ggml_backend_graph_compute(be, gf);
                ts[r] = now_s() - t0;
            }
            qsort(ts, runs, sizeof(double), cmp_d);
            double med = runs % 2 ? ts[runs / 2] : 0.5 * (ts[runs / 2 - 1] + ts[runs / 2]);
            row_t R = {"", bpw, bytes, copies, tokens, nth, runs, mmid ? "mul_mat_id" : "mul_mat",
                       repacked, med * 1e3, ts[0] * 1e3, ts[runs - 1] * 1e3, bytes / med / 1e9, bytes / ts[0] / 1e9, err};
            snprintf(R.type, sizeof R.type, "%s", tname);
            rows[nrows++] = R;
            printf("%-11s %5.3f %10zu %6d %6d %3d %7d %8.2f %8.2f %8.2f %7.1f %7.1f %9.2e\n", R.type, R.bpw, R.bytes,
                   R.repacked, R.copies, R.tokens, R.threads, R.med_ms, R.min_ms, R.max_ms, R.gbs_med, R.gbs_max, R.check);
            fflush(stdout);
        }
        w1[0]->data = d1; w3[0]->data = d3; w2[0]->data = d2;
        free(ts);
        ggml_free(cctx);
        ggml_backend_buffer_free(wbuf);
        ggml_free(wctx);
        free(w1); free(w2); free(w3); free(q13); free(q2);
    }
    if (json) {
        FILE *fp = fopen(json, "w");
        if (!fp) { perror(json); return 1; }
        fprintf(fp, "{\"hidden\": %d, \"inter\": %d, \"pool_mib\": %d, \"rows\": [\n", HIDDEN, INTER, pool_mib);
        for (int i = 0; i < nrows; i++) {
            row_t *R = &rows[i];
            fprintf(fp, "  {\"type\": \"%s\", \"bpw\": %.4f, \"bytes\": %zu, \"copies\": %d, \"tokens\": %d, "
                        "\"threads\": %d, \"runs\": %d, \"mode\": \"%s\", \"repacked\": %d, \"median_ms\": %.4f, "
                        "\"min_ms\": %.4f, \"max_ms\": %.4f, \"gbs_median\": %.3f, \"gbs_max\": %.3f",
                    R->type, R->bpw, R->bytes, R->copies, R->tokens, R->threads, R->runs, R->mode, R->repacked,
                    R->med_ms, R->min_ms, R->max_ms, R->gbs_med, R->gbs_max);
            if (!isnan(R->check)) fprintf(fp, ", \"check_rel_err\": %.3e", R->check);
            fprintf(fp, "}%s\n", i + 1 < nrows ? "," : "");
        }
        fprintf(fp, "]}\n");
        fclose(fp);
    }
    ggml_backend_free(be);
    return 0;
}
