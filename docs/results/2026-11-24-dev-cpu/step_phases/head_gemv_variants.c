#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <omp.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static inline float dotrow(const uint16_t*wn,const float*xt,int64_t K,int acc4){
  int64_t k=0;
  if(!acc4){ __m256 a0=_mm256_setzero_ps(),a1=_mm256_setzero_ps();
   for(;k+16<=K;k+=16){a0=_mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wn+k))),_mm256_loadu_ps(xt+k),a0);
    a1=_mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wn+k+8))),_mm256_loadu_ps(xt+k+8),a1);}
   a0=_mm256_add_ps(a0,a1); float s[8]; _mm256_storeu_ps(s,a0); return s[0]+s[1]+s[2]+s[3]+s[4]+s[5]+s[6]+s[7];}
  __m256 a0=_mm256_setzero_ps(),a1=_mm256_setzero_ps(),a2=_mm256_setzero_ps(),a3=_mm256_setzero_ps();
  for(;k+32<=K;k+=32){a0=_mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wn+k))),_mm256_loadu_ps(xt+k),a0);
    a1=_mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wn+k+8))),_mm256_loadu_ps(xt+k+8),a1);
    a2=_mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wn+k+16))),_mm256_loadu_ps(xt+k+16),a2);
    a3=_mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wn+k+24))),_mm256_loadu_ps(xt+k+24),a3);}
  a0=_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)); float s[8]; _mm256_storeu_ps(s,a0); return s[0]+s[1]+s[2]+s[3]+s[4]+s[5]+s[6]+s[7];}
int main(){ int64_t N=32000,K=4096; int nb=4; uint16_t*w[4]; for(int i=0;i<nb;i++){w[i]=aligned_alloc(64,N*K*2); for(int64_t j=0;j<N*K;j++)w[i][j]=0x3c00^(j&0xff);}
 float*x=aligned_alloc(64,K*4),*out=aligned_alloc(64,N*4); for(int k=0;k<K;k++)x[k]=0.001f*k;
 int th=omp_get_max_threads();
 for(int rep=0;rep<3;rep++) for(int v=0;v<6;v++){ double best=1e9, tot=0; int runs=12;
  for(int r=0;r<runs;r++){ const uint16_t*W=w[r%nb]; double t=now(); int64_t chunk = v<2?16: v<4? N/(8*th) : N/(2*th); int acc4=v&1;
   #pragma omp parallel for schedule(dynamic,chunk)
   for(int64_t n=0;n<N;n++) out[n]=dotrow(W+n*K,x,K,acc4);
   t=now()-t; tot+=t; if(t<best)best=t;}
  printf("chunk %s acc%d: best %.2f ms mean %.2f ms (%.1f GB/s)\n", v<2?"16":v<4?"N/8t":"N/2t", (v&1)?4:2, best*1e3, tot/runs*1e3, N*K*2/best/1e9);}
}
