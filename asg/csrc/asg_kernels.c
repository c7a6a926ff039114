/* CPU kernels for ASG tables: scoring hidden states against compact codes, and rebuilding rows.
 *
 * Codes are a row-major (V, m) table of small integers; token t, segment i uses row
 * i*step + codes[t, i] of a (rows, ds) codebook or (B, rows) score table, where step is k for
 * separate codebooks and 0 for a shared one (score tables always have one block of k per segment).
 * Each kernel exists for every code type (uint8, int16, uint16, int32) and takes the thread count.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TOKEN_BLOCK 512
#define LANES 16

/* GCC/Clang vector types: SIMD on any target, no intrinsics. */
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef int32_t ints __attribute__((vector_size(4 * LANES)));

/* out[r] = index of the first minimum of row r of an (n, k) row-major matrix: the assignment step
 * of k-means after a matmul has scored every point against every centroid. */
void asg_argmin_rows(const float* x, int64_t n, int64_t k, int64_t* out, int nthreads) {
  _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
  for (int64_t r = 0; r < n; r++) {
    const float* row = x + r * k;
    floats best_v;
    ints at_v = {0}, pos, step;
    for (int l = 0; l < LANES; l++) { best_v[l] = FLT_MAX; pos[l] = l; step[l] = LANES; }
    int64_t j = 0;
    for (; j + LANES <= k; j += LANES) {
      floats v;
      memcpy(&v, row + j, sizeof v);
      ints lower = v < best_v;
      best_v = (floats)((lower & (ints)v) | (~lower & (ints)best_v));
      at_v = (lower & pos) | (~lower & at_v);
      pos += step;
    }
    float best = FLT_MAX;
    int32_t at = 0;
    for (int l = 0; l < LANES; l++)
      if (best_v[l] < best || (best_v[l] == best && at_v[l] < at)) { best = best_v[l]; at = at_v[l]; }
    for (; j < k; j++)
      if (row[j] < best) { best = row[j]; at = (int32_t)j; }
    out[r] = at;
  }
}

#define ASG_KERNELS(NAME, CODE)                                                                     \
/* out[b, t] = sum_i tables[b, i*k + codes[t, i]]   (tables: B x m*k, out: B x V); best for tiny B */ \
void asg_lut_rows_##NAME(const float* tables, const CODE* codes, float* out, int64_t B, int64_t V,   \
                         int64_t m, int64_t k, int nthreads) {                                      \
  _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                \
  for (int64_t t = 0; t < V; t++) {                                                                 \
    const CODE* c = codes + t * m;                                                                  \
    for (int64_t b = 0; b < B; b++) {                                                               \
      const float* tb = tables + b * m * k;                                                         \
      float acc = 0.f;                                                                              \
      for (int64_t i = 0; i < m; i++) acc += tb[i * k + (int64_t)c[i]];                             \
      out[b * V + t] = acc;                                                                         \
    }                                                                                               \
  }                                                                                                 \
}                                                                                                   \
/* The same sums from transposed tables (m x k x B), segment by segment over blocks of tokens, so    \
 * that one segment's table and the block's sums stay in cache: each lookup adds a B-vector. */     \
void asg_lut_cols_##NAME(const float* tables_t, const CODE* codes, float* out, int64_t B, int64_t V, \
                         int64_t m, int64_t k, int nthreads) {                                      \
  _Pragma("omp parallel num_threads(nthreads)")                                                     \
  {                                                                                                 \
    float* acc = (float*)malloc(sizeof(float) * TOKEN_BLOCK * B);                                   \
    _Pragma("omp for schedule(static)")                                                             \
    for (int64_t t0 = 0; t0 < V; t0 += TOKEN_BLOCK) {                                               \
      int64_t n = V - t0 < TOKEN_BLOCK ? V - t0 : TOKEN_BLOCK;                                      \
      memset(acc, 0, sizeof(float) * n * B);                                                        \
      for (int64_t i = 0; i < m; i++) {                                                             \
        const float* table = tables_t + i * k * B;                                                  \
        const CODE* c = codes + t0 * m + i;                                                         \
        for (int64_t j = 0; j < n; j++) {                                                           \
          const float* r = table + (int64_t)c[j * m] * B;                                           \
          float* a = acc + j * B;                                                                   \
          for (int64_t b = 0; b < B; b++) a[b] += r[b];                                             \
        }                                                                                           \
      }                                                                                             \
      for (int64_t b = 0; b < B; b++)                                                               \
        for (int64_t j = 0; j < n; j++) out[b * V + t0 + j] = acc[j * B + b];                       \
    }                                                                                               \
    free(acc);                                                                                      \
  }                                                                                                 \
}                                                                                                   \
/* out[j] = concat_i codebooks[i*step + codes[ids[j], i]]  (ids NULL: every token, j = t) */       \
void asg_gather_##NAME(const float* codebooks, const CODE* codes, const int64_t* ids, float* out,   \
                       int64_t n, int64_t m, int64_t ds, int64_t step, int nthreads) {              \
  _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                \
  for (int64_t j = 0; j < n; j++) {                                                                 \
    const CODE* c = codes + (ids ? ids[j] : j) * m;                                                 \
    float* o = out + j * m * ds;                                                                    \
    for (int64_t i = 0; i < m; i++)                                                                 \
      memcpy(o + i * ds, codebooks + (i * step + (int64_t)c[i]) * ds, sizeof(float) * ds);          \
  }                                                                                                 \
}

ASG_KERNELS(u8, uint8_t)
ASG_KERNELS(i16, int16_t)
ASG_KERNELS(u16, uint16_t)
ASG_KERNELS(i32, int32_t)
