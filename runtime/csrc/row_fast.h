/* moe-pack CPU kernel: the fast path at one vector width. qgemv_cpu.c includes this once per
 * width after defining
 *   RF_ROW        the function's name, and RF_BLOCKS its helper's
 *   RF_L          words per vector step, and groups per meta block (8 or 16)
 *   RF_(op)       that width's operation `op` (vec.h: v8_op or v16_op)
 *   RF_VI, RF_VF  its integer and float vector types
 * which the end of this file undefines.
 *
 * Meta decoded in registers, RF_L groups at a time, inside the word loop, instead of a per-row
 * decode pass (that pass cost 25-45% of the time). Needs WPG = 2^wpg_log2 words per group: the
 * block's scales reach word lanes through one permute. A block takes one (step, min) pair where
 * it lies inside a meta group, and each lane its own where it straddles two (meta groups not a
 * multiple of RF_L groups, or rows that are not). The groups past the row's last whole block
 * (fewer than RF_L) are one more block whose lanes past the row have scale and zero 0. What
 * they read there is finite and adds exact zeros: the next row's codes and meta codes, or the
 * bytes after the matrix's codes (FORMAT.md puts its meta floats there), meet x's padding
 * words, which xq_alloc zeroes, and the next token's d or xq_alloc's zeros. With 4-bit meta
 * codes every block must start on an even group (qgemv_cpu.c, fast_path). x is in blocks of
 * RF_L words (qgemv_cpu.c, XPI). Xg: x summed per group (per token).
 *     y = sum_j s_j d_j f_j  -  sum_g s_g z_g Xg_g      (f_j: word j's integer dot)
 * both in one sum per token and lane. */

/* Blocks [g0, e) of a row (RF_L groups each), sharing one (step, min) pair per lane for the
 * scales (ss, sm) and one for minus the zeros (nzs, nzm), added to acc[nt]. A block is `steps`
 * vector steps of RF_L words (all WPG of them, but fewer for a row's last groups). */
static inline __attribute__((always_inline)) void RF_BLOCKS(const uint32_t *qn, const uint16_t *hn, const int bits,
                                                            const int w, int64_t U, int wpg_log2, int64_t i0,
                                                            const uint8_t *scale, const uint8_t *zero, const int mb,
                                                            const int a8, const int nt, const int32_t *xp, int64_t xs, const float *d,
                                                            int64_t ds, int64_t g0, int64_t e, int64_t steps, RF_VF ss,
                                                            RF_VF sm, RF_VF nzs, RF_VF nzm, RF_VF *acc) {
    const int h = 16 / w;
    const uint32_t m = (1u << w) - 1u;
    const int64_t wpg = (int64_t)1 << wpg_log2;
    const RF_VI pairmask = RF_(set1)((int32_t)(m | (m << 16)));
    const RF_VI hibit = RF_(set1)(0x00040004);
    for (int64_t gb = g0; gb < e; gb += RF_L) {
        const RF_VF sb = RF_(fma)(RF_(cvt)(RF_(meta)(scale, i0 + gb, mb)), ss, sm);
        const RF_VF nzb = RF_(fma)(RF_(cvt)(RF_(meta)(zero, i0 + gb, mb)), nzs, nzm);  /* -z, exactly */
        const RF_VF nsz = RF_(mul)(sb, nzb);
        for (int i = 0; i < nt; i++) acc[i] = RF_(fma)(nsz, RF_(loadf)(d + i * ds + 2 * U + gb), acc[i]);
        for (int64_t r = 0; r < steps; r++) {
            const int64_t j = gb * wpg + RF_L * r;  /* a multiple of RF_L: a whole block of x */
            const RF_VF sl = wpg_log2 > 0 ? RF_(lanes)(sb, r, wpg_log2) : sb;
            const RF_VI word = RF_(loadu)(qn + j);
            if (a8) {
                /* int8 activations (quantize_x_word8): byte vector k holds code nv b + k in byte b
                 * of each word, one shift and one mask; each token's x bytes meet them in nv
                 * vpmaddubsw (vec.h, _dotb), half the products' instructions of the int16 path */
                const int nv = 8 / w;
                const RF_VI bytemask = RF_(set1)(w == 4 ? 0x0F0F0F0F : 0x03030303);
                RF_VI v[4];
                for (int k = 0; k < nv; k++) v[k] = RF_(and)(k ? RF_(srli16)(word, w * k) : word, bytemask);
                if (bits == 3) {
                    const RF_VI hb = RF_(hi3b)(hn + j), four = RF_(set1)(0x04040404);
                    v[0] = RF_(or)(v[0], RF_(and)(RF_(slli32)(hb, 2), four));
                    v[1] = RF_(or)(v[1], RF_(and)(RF_(slli32)(hb, 1), four));
                    v[2] = RF_(or)(v[2], RF_(and)(hb, four));
                    v[3] = RF_(or)(v[3], RF_(and)(RF_(srli32)(hb, 1), four));
                }
                for (int i = 0; i < nt; i++) {
                    const RF_VI dot = RF_(dotb)(v, xp + i * xs + j * nv, nv);
                    acc[i] = RF_(fma)(sl, RF_(mul)(RF_(cvt)(dot), RF_(loadf)(d + i * ds + j)), acc[i]);
                }
                continue;
            }
            const RF_VI hs = bits == 3 ? RF_(hi3)(hn + j) : RF_(zero)();
            if (nt < MP_TB && w != 4) {
                /* 2- and 3-bit codes, 1 or 2 tokens: each pair decoded as the products need it,
                 * one chain per token (two for one token, so that a product does not wait for
                 * the one before). Decoding the 8 pairs first cost 3-bit rows 2% at one token and
                 * 11% at two on dev-cpu (BENCHMARKS.md section 27). */
                RF_VI dot[MP_TB];
                for (int i = 0; i < MP_TB; i++) dot[i] = RF_(zero)();
                for (int p = 0; p < h; p++) {
                    RF_VI v = RF_(pair)(word, pairmask, bits, w, h, p);
                    if (bits == 3) v = RF_(or)(v, RF_(and)(RF_(srli32)(hs, p), hibit));
                    for (int i = 0; i < nt; i++) {
                        const int c = nt == 1 ? (p & 1) : i;
                        dot[c] = RF_(dot)(dot[c], v, RF_(loadu)(xp + i * xs + j * h + RF_L * p));
                    }
                }
                if (nt == 1) dot[0] = RF_(add)(dot[0], dot[1]);
                for (int i = 0; i < nt; i++)
                    acc[i] = RF_(fma)(sl, RF_(mul)(RF_(cvt)(dot[i]), RF_(loadf)(d + i * ds + j)), acc[i]);
                continue;
            }
            /* MP_TB tokens, or 4-bit codes: the word's h pairs decoded once, then each token's two
             * chains and its sum in turn, not nt chains at once, which spilled out of AVX2's 16
             * registers (dev-cpu, cycles per 128 weights and token: 2-bit at 4 tokens 14.2 ->
             * 12.6, 4-bit at one token 17.2 -> 15.3; BENCHMARKS.md section 27) */
            RF_VI v[8];
            for (int p = 0; p < h; p++) {
                v[p] = RF_(pair)(word, pairmask, bits, w, h, p);
                if (bits == 3) v[p] = RF_(or)(v[p], RF_(and)(RF_(srli32)(hs, p), hibit));
            }
            for (int i = 0; i < nt; i++) {
                const int32_t *xi = xp + i * xs + j * h;
                RF_VI d0 = RF_(zero)(), d1 = RF_(zero)();
                for (int p = 0; p < h; p += 2) {
                    d0 = RF_(dot)(d0, v[p], RF_(loadu)(xi + RF_L * p));
                    d1 = RF_(dot)(d1, v[p + 1], RF_(loadu)(xi + RF_L * (p + 1)));
                }
                acc[i] = RF_(fma)(sl, RF_(mul)(RF_(cvt)(RF_(add)(d0, d1)), RF_(loadf)(d + i * ds + j)), acc[i]);
            }
        }
    }
}

/* One row for nt tokens (1 .. MP_TB, a constant once inlined) into out[nt]: token i's x at
 * xp + i xs, its d at d + i ds and its Xg at d + i ds + 2U. Each pair of codes is decoded once
 * for all nt tokens, which a prompt's tokens share (3-bit: 29.5 -> 16.6 cycles per 128 weights
 * and token at 4 tokens, tools/cpu_kernel_cycles.c on dev-cpu). A token's float sums take the same
 * steps in the same order whatever nt is, and its integer dots are exact: the result does not
 * depend on which tokens share a pass. */
static inline __attribute__((always_inline)) void RF_ROW(const uint32_t *qn, const uint16_t *hn, const int bits,
                                                         const int w, int64_t gpr, int wpg_log2, int64_t i0,
                                                         const uint8_t *scale, const float *smeta,
                                                         const uint8_t *zero, const float *zmeta, int64_t mg,
                                                         const int mb, const int a8, const int nt, const int32_t *xp, int64_t xs,
                                                         const float *d, int64_t ds, float *out) {
    const int64_t wpg = (int64_t)1 << wpg_log2, U = gpr << wpg_log2;
    RF_VF acc[MP_TB];
    for (int i = 0; i < nt; i++) acc[i] = RF_(zerof)();
#define RF_ARGS qn, hn, bits, w, U, wpg_log2, i0, scale, zero, mb, a8, nt, xp, xs, d, ds
    if (__builtin_expect(gpr % RF_L == 0 && mg % RF_L == 0, 1)) {  /* blocks tile the row and the meta groups */
        for (int64_t g0 = 0; g0 < gpr;) {
            const int64_t mi = (i0 + g0) / mg;
            int64_t e = (mi + 1) * mg - i0;
            if (e > gpr) e = gpr;
            /* the zero term is subtracted in the same sums: no second set of nt registers */
            RF_BLOCKS(RF_ARGS, g0, e, wpg, RF_(set1f)(smeta[2 * mi]), RF_(set1f)(smeta[2 * mi + 1]),
                      RF_(set1f)(-zmeta[2 * mi]), RF_(set1f)(-zmeta[2 * mi + 1]), acc);
            g0 = e;
        }
        for (int i = 0; i < nt; i++) out[i] = RF_(hsum)(acc[i]);
        return;
    }
    const int64_t gfull = gpr / RF_L * RF_L;  /* the groups of whole blocks */
    int64_t mi = i0 / mg, e = (mi + 1) * mg - i0;  /* the meta group of group g0, and where it ends */
    for (int64_t g0 = 0; g0 < gfull;) {
        if (g0 >= e) mi++, e += mg;  /* mg >= RF_L: a block meets two meta groups at most */
        const int64_t eb = g0 + ((e < gfull ? e : gfull) - g0) / RF_L * RF_L;  /* the blocks inside meta group mi */
        if (eb > g0) {
            RF_BLOCKS(RF_ARGS, g0, eb, wpg, RF_(set1f)(smeta[2 * mi]), RF_(set1f)(smeta[2 * mi + 1]),
                      RF_(set1f)(-zmeta[2 * mi]), RF_(set1f)(-zmeta[2 * mi + 1]), acc);
            g0 = eb;
            continue;
        }
        /* one block across meta group mi's end: its first e - g0 lanes take mi's pairs, the rest mi + 1's */
        const int64_t k = e - g0, m1 = mi + 1;
        RF_BLOCKS(RF_ARGS, g0, g0 + RF_L, wpg, RF_(first)(k, RF_(set1f)(smeta[2 * mi]), RF_(set1f)(smeta[2 * m1])),
                  RF_(first)(k, RF_(set1f)(smeta[2 * mi + 1]), RF_(set1f)(smeta[2 * m1 + 1])),
                  RF_(first)(k, RF_(set1f)(-zmeta[2 * mi]), RF_(set1f)(-zmeta[2 * m1])),
                  RF_(first)(k, RF_(set1f)(-zmeta[2 * mi + 1]), RF_(set1f)(-zmeta[2 * m1 + 1])), acc);
        g0 += RF_L;
    }
    if (gfull < gpr) {  /* the row's last groups, fewer than RF_L: one more block, its lanes past the row scaled by 0 */
        const int64_t tg = gpr - gfull, steps = (tg * wpg + RF_L - 1) / RF_L;  /* fewer steps where groups span them */
        if (gfull >= e) mi++, e += mg;
        const int64_t k = e - gfull, m1 = k < tg ? mi + 1 : mi;  /* mi + 1 only where the row reaches it */
        const RF_VF z = RF_(zerof)();
        RF_BLOCKS(RF_ARGS, gfull, gfull + RF_L, steps,
                  RF_(first)(tg, RF_(first)(k, RF_(set1f)(smeta[2 * mi]), RF_(set1f)(smeta[2 * m1])), z),
                  RF_(first)(tg, RF_(first)(k, RF_(set1f)(smeta[2 * mi + 1]), RF_(set1f)(smeta[2 * m1 + 1])), z),
                  RF_(first)(tg, RF_(first)(k, RF_(set1f)(-zmeta[2 * mi]), RF_(set1f)(-zmeta[2 * m1])), z),
                  RF_(first)(tg, RF_(first)(k, RF_(set1f)(-zmeta[2 * mi + 1]), RF_(set1f)(-zmeta[2 * m1 + 1])), z), acc);
    }
#undef RF_ARGS
    for (int i = 0; i < nt; i++) out[i] = RF_(hsum)(acc[i]);
}

#undef RF_ROW
#undef RF_BLOCKS
#undef RF_L
#undef RF_
#undef RF_VI
#undef RF_VF
