/* moe-pack CPU kernel: the fast path's rows for a prompt's tokens, MP_TB (4) tokens at a time (fast_rows.h,
 * qgemv_cpu.c's fast_tokens). A file of its own because these copies are much of the library's
 * build time: runtime/cpu_build.py compiles the kernel's files in parallel. */
#include "fast_rows.h"

#ifdef MP_AVX2
void mp_fast_tokens4(const mp_mat *a, const mp_geo *g, const mp_xq *q, int64_t n, int64_t t0, float *v) {
    fast_values(a, g, q, n, t0, MP_TB, v);
}
#else
typedef int mp_no_fast_path;  /* ISO C: a translation unit declares something */
#endif
