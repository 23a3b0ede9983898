/* moe-pack CPU kernel: one packed matrix of a .moepack file as the C code sees it (FORMAT.md
 * "Quantized matrices" and "Bit planes"), shared by the GEMV (qgemv_cpu.c) and the dense
 * conversions (dense_cpu.c): the matrix's component addresses, the check of a layout the C code
 * takes, and the per-group (scale, zero) decode. */
#ifndef MP_PACKED_H
#define MP_PACKED_H
#include <stdint.h>

#define MP_OK 0
#define MP_UNSUPPORTED 1
#define MP_NOMEM 2

/* One packed matrix: component addresses and geometry (FORMAT.md "Quantized matrices"). */
typedef struct {
    const uint32_t *q;    /* low plane as u32 words [N][K/CU] */
    const uint16_t *qhi;  /* 3-bit: high plane as u16 [N][K/CU]; else NULL */
    const uint8_t *scale, *zero;  /* codes per group: u8 (mb 8) or nibbles, group 2j low in byte j (mb 4) */
    const float *smeta, *zmeta;   /* (step, min) f32 pairs per mg groups */
    int64_t mg, group, N, K;
    int bits, mb;
} mp_mat;

/* Bits per field of the low plane: 2 for 2- and 3-bit codes (3-bit keeps its high bit in a
 * plane of its own), 4 for 4-bit. */
static inline int packed_width(int bits) { return bits == 4 ? 4 : 2; }

/* MP_OK where the C code takes this layout: 2-, 3- or 4-bit codes, groups of whole words that
 * tile the row, 8- or 4-bit meta; else MP_UNSUPPORTED (the caller falls back to torch). */
static inline int packed_supported(const mp_mat *m) {
    if (m->bits != 2 && m->bits != 3 && m->bits != 4) return MP_UNSUPPORTED;
    const int cu = 32 / packed_width(m->bits);
    if (m->K <= 0 || m->N <= 0 || m->mg <= 0 || m->group % cu || m->K % m->group) return MP_UNSUPPORTED;
    if (m->bits == 3 && m->qhi == NULL) return MP_UNSUPPORTED;
    if (m->mb != 8 && m->mb != 4) return MP_UNSUPPORTED;
    return MP_OK;
}

static inline mp_mat matrix_at(const uint8_t *base, const int64_t *d) {
    /* d: byte offsets of q, q_hi (-1: none), scale, scale_meta, zero, zero_meta; then mg,
     * group, N, K, bits, meta bits */
    mp_mat m;
    m.q = (const uint32_t *)(base + d[0]);
    m.qhi = d[1] >= 0 ? (const uint16_t *)(base + d[1]) : NULL;
    m.scale = base + d[2];
    m.smeta = (const float *)(base + d[3]);
    m.zero = base + d[4];
    m.zmeta = (const float *)(base + d[5]);
    m.mg = d[6];
    m.group = d[7];
    m.N = d[8];
    m.K = d[9];
    m.bits = (int)d[10];
    m.mb = (int)d[11];
    return m;
}

/* The meta code of group i: a byte (8-bit meta) or a nibble, group 2j low in byte j (4-bit). */
static inline int meta_code(const uint8_t *codes, int64_t i, int mb) {
    return mb == 8 ? codes[i] : (codes[i >> 1] >> (4 * (i & 1))) & 15;
}

/* One row's (scale, zero) per word: the groups decoded, then repeated WPG = group/CU times. */
static inline void decode_row_meta(int64_t n, int64_t gpr, int64_t wpg, const uint8_t *scale,
                                   const float *smeta, const uint8_t *zero, const float *zmeta, int64_t mg, int mb, float *sw, float *zw) {
    int64_t i0 = n * gpr;
    for (int64_t g = 0; g < gpr;) {  /* one pass per meta group the row overlaps */
        int64_t m = (i0 + g) / mg;
        int64_t e = (m + 1) * mg - i0;
        if (e > gpr) e = gpr;
        const float ss = smeta[2 * m], sm = smeta[2 * m + 1], zs = zmeta[2 * m], zm = zmeta[2 * m + 1];
        if (wpg == 1 && mb == 8) {
            const uint8_t *sc = scale + i0, *zc = zero + i0;
            for (int64_t k = g; k < e; k++) {  /* vectorizes: u8 -> f32, a multiply, an add */
                sw[k] = ss * (float)sc[k] + sm;
                zw[k] = zs * (float)zc[k] + zm;
            }
        } else {
            for (int64_t k = g; k < e; k++) {
                const float s = ss * (float)meta_code(scale, i0 + k, mb) + sm, z = zs * (float)meta_code(zero, i0 + k, mb) + zm;
                for (int64_t r = 0; r < wpg; r++) {
                    sw[k * wpg + r] = s;
                    zw[k * wpg + r] = z;
                }
            }
        }
        g = e;
    }
}

#endif
