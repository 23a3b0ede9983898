/* moe-pack CPU kernel: one row's fast path at one vector width. qgemv_cpu.c includes this once
 * per width after defining
 *   RF_NAME       the function's name
 *   RF_L          words per vector step, and groups per meta block (8 or 16)
 *   RF_(op)       that width's operation `op` (vec.h: v8_op or v16_op)
 *   RF_VI, RF_VF  its integer and float vector types
 * which the end of this file undefines.
 *
 * Meta decoded in registers, RF_L groups at a time, inside the word loop, instead of a per-row
 * decode pass (that pass cost 25-45% of the time). Needs gpr and mg multiples of RF_L (a block
 * never straddles a meta group) and WPG = 2^wpg_log2 words per group: the block's scales reach
 * word lanes through one permute. x is in blocks of RF_L words (qgemv_cpu.c, XPI). Xg: x summed
 * per group (per token).
 *     y = sum_j s_j d_j f_j  -  sum_g s_g z_g Xg_g      (f_j: word j's integer dot) */
static inline __attribute__((always_inline)) float RF_NAME(const uint32_t *qn, const uint16_t *hn, const int bits,
                                                           const int w, int64_t gpr, int wpg_log2, int64_t i0,
                                                           const uint8_t *scale, const float *smeta,
                                                           const uint8_t *zero, const float *zmeta, int64_t mg,
                                                           const int mb, const int32_t *xp, const float *d,
                                                           const float *Xg) {
    const int h = 16 / w;
    const uint32_t m = (1u << w) - 1u;
    const int64_t wpg = (int64_t)1 << wpg_log2;
    const RF_VI pairmask = RF_(set1)((int32_t)(m | (m << 16)));
    const RF_VI hibit = RF_(set1)(0x00040004);
    RF_VF acc = RF_(zerof)(), accz = RF_(zerof)();
    for (int64_t g0 = 0; g0 < gpr;) {
        const int64_t mi = (i0 + g0) / mg;
        int64_t e = (mi + 1) * mg - i0;
        if (e > gpr) e = gpr;
        const RF_VF ss = RF_(set1f)(smeta[2 * mi]), sm = RF_(set1f)(smeta[2 * mi + 1]);
        const RF_VF zs = RF_(set1f)(zmeta[2 * mi]), zm = RF_(set1f)(zmeta[2 * mi + 1]);
        for (int64_t gb = g0; gb < e; gb += RF_L) {
            const RF_VF sb = RF_(fma)(RF_(cvt)(RF_(meta)(scale, i0 + gb, mb)), ss, sm);
            const RF_VF zb = RF_(fma)(RF_(cvt)(RF_(meta)(zero, i0 + gb, mb)), zs, zm);
            accz = RF_(fma)(RF_(mul)(sb, zb), RF_(loadf)(Xg + gb), accz);
            for (int64_t r = 0; r < wpg; r++) {
                const int64_t j = gb * wpg + RF_L * r;  /* a multiple of RF_L: a whole block of x */
                const RF_VI word = RF_(loadu)(qn + j);
                const int32_t *xb = xp + j * h;
                const RF_VI hs = bits == 3 ? RF_(hi3)(hn + j) : RF_(zero)();
                RF_VI dot0 = RF_(zero)(), dot1 = RF_(zero)();
                for (int p = 0; p < h; p++) {
                    RF_VI v = RF_(pair)(word, pairmask, bits, w, h, p);
                    if (bits == 3) v = RF_(or)(v, RF_(and)(RF_(srli32)(hs, p), hibit));
                    const RF_VI xv = RF_(loadu)(xb + RF_L * p);
                    if (p & 1)
                        dot1 = RF_(dot)(dot1, v, xv);
                    else
                        dot0 = RF_(dot)(dot0, v, xv);
                }
                const RF_VF f = RF_(mul)(RF_(cvt)(RF_(add)(dot0, dot1)), RF_(loadf)(d + j));
                acc = RF_(fma)(wpg_log2 > 0 ? RF_(lanes)(sb, r, wpg_log2) : sb, f, acc);
            }
        }
        g0 = e;
    }
    return RF_(hsum)(acc) - RF_(hsum)(accz);
}

#undef RF_NAME
#undef RF_L
#undef RF_
#undef RF_VI
#undef RF_VF
