/* moe-pack CPU kernel: the fast path's rows (row_fast.h at 8 and 16 lanes) and fast_values,
 * their dispatch by geometry. Included by qgemv_cpu.c (one token: decode), prompt_cpu.c (4 of a
 * prompt's tokens) and prompt2_cpu.c (2), each instantiating only the copies it calls. */
#ifndef MP_FAST_ROWS_H
#define MP_FAST_ROWS_H
#include "kernel.h"

#ifdef MP_AVX2
/* The fast path (row_fast.h) at 8 lanes, and at 16 where vec.h has them. */
#define RF_ROW row_fast8
#define RF_BLOCKS row_blocks8
#define RF_L 8
#define RF_(op) v8_##op
#define RF_VI v8i
#define RF_VF v8f
#include "row_fast.h"
#if MP_WIDE
#define RF_ROW row_fast16
#define RF_BLOCKS row_blocks16
#define RF_L 16
#define RF_(op) v16_##op
#define RF_VI v16i
#define RF_VF v16f
#include "row_fast.h"
#endif

/* Row n of a for tokens t0 .. t0+nt-1 (nt: 1, 2 or MP_TB) into v[nt], on the fast path (row_fast.h).
 * FAST: the quantizer's defaults, with the code width, words per group and meta width constant
 * (loops unrolled, no branch on the meta width per block) and a copy per nt; ONE: the other
 * geometries, one token at a time. Every copy is a large unrolled body and costs build time
 * (~0.1 s), so only the defaults get the multi-token ones. */
static inline __attribute__((always_inline)) void fast_values(const mp_mat *a, const mp_geo *g, const mp_xq *q,
                                                               int64_t n, int64_t t0, int nt, float *v) {
    const uint32_t *qn = a->q + n * g->U;
    const uint16_t *hn = a->bits == 3 ? a->qhi + n * g->U : NULL;
    const int64_t xs = g->h * g->Up, ds = 2 * g->U + g->gpr;
    const int wl = g->wl;
#define ARGS(B, W, WL, MB, A8, T, NT)                                                                     \
    qn, hn, B, W, g->gpr, WL, n * g->gpr, a->scale, a->smeta, a->zero, a->zmeta, a->mg, MB, A8, NT, XP(g, q, T), \
        xs, XD(g, q, T), ds, v + (T - t0)
#define BY_NT_A(F, B, W, WL, MB, A8)                 \
    do {                                             \
        if (nt == 1)                                 \
            F(ARGS(B, W, WL, MB, A8, t0, 1));        \
        else if (nt == 2)                            \
            F(ARGS(B, W, WL, MB, A8, t0, 2));        \
        else                                         \
            F(ARGS(B, W, WL, MB, A8, t0, MP_TB));    \
        return;                                      \
    } while (0)
#define BY_NT(F, B, W, WL, MB) BY_NT_A(F, B, W, WL, MB, 0)
#define BY_ONE(F, B, W, WL, MB)                                              \
    do {                                                                     \
        for (int i_ = 0; i_ < nt; i_++) F(ARGS(B, W, WL, MB, 0, t0 + i_, 1)); \
        return;                                                              \
    } while (0)
/* int8 activations: g->a8 holds only on fast_default's geometries */
#define INT8(F)                                                                          \
    do {                                                                                 \
        if (a->mb == 4) {                                                                \
            if (a->bits == 2) BY_NT_A(F, 2, 2, 0, 4, 1);                                 \
            BY_NT_A(F, 3, 2, 2, 4, 1);                                                   \
        }                                                                                \
        if (a->bits == 2) BY_NT_A(F, 2, 2, 0, 8, 1);                                     \
        if (a->bits == 3) BY_NT_A(F, 3, 2, 2, 8, 1);                                     \
        BY_NT_A(F, 4, 4, 3, 8, 1);                                                       \
    } while (0)
#if MP_WIDE
    if (g->xb == 16) {  /* Mixtral's shapes: every matrix has 16 | groups per row */
        if (g->a8) INT8(row_fast16);
#define FAST(B, W, WL, MB) BY_NT(row_fast16, B, W, WL, MB)
#define ONE(B, W, WL, MB) BY_ONE(row_fast16, B, W, WL, MB)
        if (a->mb == 4) {
            if (a->bits == 2) { if (wl == 0) FAST(2, 2, 0, 4); ONE(2, 2, wl, 4); }
            if (a->bits == 3) { if (wl == 2) FAST(3, 2, 2, 4); ONE(3, 2, wl, 4); }
            ONE(4, 4, wl, 4);
        }
        if (a->bits == 2) { if (wl == 0) FAST(2, 2, 0, 8); ONE(2, 2, wl, 8); }
        if (a->bits == 3) { if (wl == 2) FAST(3, 2, 2, 8); ONE(3, 2, wl, 8); }
        if (wl == 3) FAST(4, 4, 3, 8);
        ONE(4, 4, wl, 8);
#undef FAST
#undef ONE
    }
#endif
#define FAST(B, W, WL, MB) BY_NT(row_fast8, B, W, WL, MB)
#define ONE(B, W, WL, MB) BY_ONE(row_fast8, B, W, WL, MB)
    if (g->a8) INT8(row_fast8);
    if (a->mb == 4) {  /* FAST and ONE return */
        if (a->bits == 2) { if (wl == 0) FAST(2, 2, 0, 4); ONE(2, 2, wl, 4); }
        if (a->bits == 3) { if (wl == 2) FAST(3, 2, 2, 4); ONE(3, 2, wl, 4); }
        ONE(4, 4, wl, 4);
    }
    if (a->bits == 2) { if (wl == 0) FAST(2, 2, 0, 8); if (wl == 3) ONE(2, 2, 3, 8); ONE(2, 2, wl, 8); }
    if (a->bits == 3) { if (wl == 2) FAST(3, 2, 2, 8); if (wl == 1) ONE(3, 2, 1, 8); ONE(3, 2, wl, 8); }
    if (wl == 3) FAST(4, 4, 3, 8);
    if (wl == 2) ONE(4, 4, 2, 8);
    ONE(4, 4, wl, 8);
#undef FAST
#undef ONE
#undef BY_NT
#undef BY_NT_A
#undef BY_ONE
#undef INT8
#undef ARGS
}

/* fast_values for a prompt's tokens: 4 (MP_TB) at a time in prompt_cpu.c, 2 in prompt2_cpu.c.
 * Hidden: qgemv_cpu.c calls them inside the library, and only moepack_* is its interface. */
__attribute__((visibility("hidden")))
void mp_fast_tokens4(const mp_mat *a, const mp_geo *g, const mp_xq *q, int64_t n, int64_t t0, float *v);
__attribute__((visibility("hidden")))
void mp_fast_tokens2(const mp_mat *a, const mp_geo *g, const mp_xq *q, int64_t n, int64_t t0, float *v);
#endif

#endif
