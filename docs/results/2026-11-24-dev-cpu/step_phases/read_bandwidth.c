#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(int c, char**v){ size_t n=(size_t)atol(v[1])<<20; char*b=aligned_alloc(4096,n); memset(b,1,n);
 size_t chunk=(size_t)atol(v[2])<<10; int reps=8; double best=1e9;
 for(int r=0;r<reps;r++){ double t=now(); __m256i tot=_mm256_setzero_si256();
 #pragma omp parallel
 { __m256i a=_mm256_setzero_si256();
 #pragma omp for schedule(dynamic,1)
 for(size_t c0=0;c0<n;c0+=chunk) for(size_t i=c0;i<c0+chunk&&i<n;i+=64){ a=_mm256_add_epi8(a,_mm256_load_si256((__m256i*)(b+i))); a=_mm256_add_epi8(a,_mm256_load_si256((__m256i*)(b+i+32)));}
 #pragma omp critical
 tot=_mm256_add_epi8(tot,a);}
 t=now()-t; if(t<best)best=t; volatile int s=_mm256_extract_epi8(tot,0);(void)s;}
 printf("%zu MiB chunk %zu KiB threads %d: %.1f GB/s\n", n>>20, chunk>>10, omp_get_max_threads(), n/best/1e9);}
