/* CPU kernels for ASG tables: scoring hidden states against compact codes, and rebuilding rows.
 *
 * Codes are a row-major (V, m) table of small integers; token t, segment i uses row
 * i*step + codes[t, i] of a (rows, ds) codebook or (B, rows) score table, where step is k for
 * separate codebooks and 0 for a shared one (score tables always have one block of k per segment).
 * Each kernel exists for every code type (uint8, int16, uint16, int32) and takes the thread count.
 */
#include <float.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TOKEN_BLOCK 512

/* GCC/Clang vector types: SIMD on any target, no intrinsics. Their width is the target's own: vectors wider
 * than its registers are lowered lane by lane, about 10x slower (measured on an AVX2 build). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float floats16 __attribute__((vector_size(64)));
typedef int32_t ints16 __attribute__((vector_size(64)));
typedef float floats8 __attribute__((vector_size(32)));
typedef int32_t ints8 __attribute__((vector_size(32)));
typedef float floats4 __attribute__((vector_size(16)));
typedef int32_t ints4 __attribute__((vector_size(16)));
typedef float floats2 __attribute__((vector_size(8)));
typedef int32_t ints2 __attribute__((vector_size(8)));
#if LANES == 16
typedef floats16 floats;
typedef ints16 ints;
#elif LANES == 8
typedef floats8 floats;
typedef ints8 ints;
#else
typedef floats4 floats;
typedef ints4 ints;
#endif

/* The vector width and the group size that the callers' padding must match. */
int asg_lanes(void) { return LANES; }

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

#define GROUP 16 /* points scored together by asg_nearest_sorted: one pass over a block serves all of them */

int asg_group(void) { return GROUP; }

/* Lane-wise (value, index) minimum of the lower and the upper half of (v, i): HALVE(from, to) defines
 * halve_<from>, from vectors of one width to vectors of half that width. */
#define HALVE(FV, FI, TV, TI)                                                                   \
  static inline void halve_##FV(FV v, FI i, TV* out_v, TI* out_i) {                             \
    TV lo_v, hi_v;                                                                              \
    TI lo_i, hi_i;                                                                              \
    memcpy(&lo_v, &v, sizeof lo_v);                                                             \
    memcpy(&hi_v, (const char*)&v + sizeof lo_v, sizeof hi_v);                                  \
    memcpy(&lo_i, &i, sizeof lo_i);                                                             \
    memcpy(&hi_i, (const char*)&i + sizeof lo_i, sizeof hi_i);                                  \
    TI upper = hi_v < lo_v;                                                                     \
    *out_v = (TV)((upper & (TI)hi_v) | (~upper & (TI)lo_v));                                    \
    *out_i = (upper & hi_i) | (~upper & lo_i);                                                  \
  }
#if LANES == 16
HALVE(floats16, ints16, floats8, ints8)
#endif
#if LANES >= 8
HALVE(floats8, ints8, floats4, ints4)
#endif
HALVE(floats4, ints4, floats2, ints2)

/* The lane-wise minimum of (v, i) halved down to two lanes, so that no loop over lanes runs per point. */
static inline void halve_to_two(floats v, ints i, floats2* v2, ints2* i2) {
  floats4 v4;
  ints4 i4;
#if LANES == 16
  floats8 v8;
  ints8 i8;
  halve_floats16(v, i, &v8, &i8);
  halve_floats8(v8, i8, &v4, &i4);
#elif LANES == 8
  halve_floats8(v, i, &v4, &i4);
#else
  v4 = v;
  i4 = i;
#endif
  halve_floats4(v4, i4, v2, i2);
}

/* The index held by the lane of best_v with the smallest value (either one where two are equal). */
static inline int32_t argmin_lanes(floats best_v, ints at_v) {
  floats2 v2;
  ints2 i2;
  halve_to_two(best_v, at_v, &v2, &i2);
  return v2[1] < v2[0] ? i2[1] : i2[0];
}

/* The smallest lane of v. */
static inline float min_lane(floats v) {
  floats2 v2;
  ints2 i2;
  ints none = {0};
  halve_to_two(v, none, &v2, &i2);
  return v2[1] < v2[0] ? v2[1] : v2[0];
}

/* Scores of GROUP points (rows of x, d values each) against the LANES centroids of block b, kept where
 * lower than each lane's best so far: the score of centroid j is hn[j] - x.c_j, the squared distance less
 * the point's own squared length, halved. */
static inline __attribute__((always_inline)) void score_block(const float* x, int64_t d, const float* ct,
                                                              const float* hn, int64_t kp, int64_t b,
                                                              floats* best_v, ints* at_v) {
  int64_t j = b * LANES;
  floats s[GROUP], h, c;
  memcpy(&h, hn + j, sizeof h);
  for (int p = 0; p < GROUP; p++) s[p] = h;
  for (int64_t l = 0; l < d; l++) {
    memcpy(&c, ct + l * kp + j, sizeof c);
    for (int p = 0; p < GROUP; p++) s[p] -= x[p * d + l] * c;
  }
  ints pos = {0};
  for (int l = 0; l < LANES; l++) pos[l] = (int32_t)j + l;
  for (int p = 0; p < GROUP; p++) {
    ints lower = s[p] < best_v[p];
    best_v[p] = (floats)((lower & (ints)s[p]) | (~lower & (ints)best_v[p]));
    at_v[p] = (lower & pos) | (~lower & at_v[p]);
  }
}

/* Whether a block at or beyond `edge` (the first value where the remaining blocks begin, going right, or end,
 * going left) may hold a centroid nearer than the best so far to one of the GROUP points: every centroid
 * there lies at least the gap along the first value away. */
static inline __attribute__((always_inline)) int worth_scoring(const float* x, int64_t d, float edge, int right,
                                                               const float* half_len, float* bound,
                                                               const floats* best_v) {
  for (int p = 0; p < GROUP; p++) {
    float gap = right ? edge - x[p * d] : x[p * d] - edge;
    float need = gap > 0.f ? 0.5f * gap * gap : 0.f;
    if (need < bound[p]) {  /* the bound may be stale (too high): refresh it before deciding */
      bound[p] = min_lane(best_v[p]) + half_len[p];
      if (need < bound[p]) return 1;
    }
  }
  return 0;
}

static inline __attribute__((always_inline)) void nearest_group(const float* x, int64_t d, const float* ct,
                                                                const float* hn, const float* lo, const float* hi,
                                                                int64_t kp, int64_t* out) {
  int64_t blocks = kp / LANES;
  floats best_v[GROUP];
  ints at_v[GROUP];
  float half_len[GROUP], bound[GROUP];
  for (int p = 0; p < GROUP; p++) {
    for (int l = 0; l < LANES; l++) { best_v[p][l] = FLT_MAX; at_v[p][l] = 0; }
    float q = 0.f;
    for (int64_t l = 0; l < d; l++) q += x[p * d + l] * x[p * d + l];
    half_len[p] = 0.5f * q;
    bound[p] = FLT_MAX;
  }
  /* Start at the block holding the middle point's first value, then widen both ways while it may pay. */
  float middle = x[(GROUP / 2) * d];
  int64_t a = 0, z = blocks - 1;
  while (a < z) {
    int64_t mid = (a + z) / 2;
    if (hi[mid] < middle) a = mid + 1; else z = mid;
  }
  score_block(x, d, ct, hn, kp, a, best_v, at_v);
  for (int64_t b = a + 1; b < blocks && worth_scoring(x, d, lo[b], 1, half_len, bound, best_v); b++)
    score_block(x, d, ct, hn, kp, b, best_v, at_v);
  for (int64_t b = a - 1; b >= 0 && worth_scoring(x, d, hi[b], 0, half_len, bound, best_v); b--)
    score_block(x, d, ct, hn, kp, b, best_v, at_v);
  for (int p = 0; p < GROUP; p++) out[p] = argmin_lanes(best_v[p], at_v[p]);
}

/* out[r] = index of the centroid nearest to row r of an (n, d) matrix whose rows are sorted by their first
 * value, n a multiple of GROUP: the k-means assignment step for small d, where the (n, k) score matrix that
 * a matmul writes costs more than the arithmetic. Centroids come sorted by their first value, transposed and
 * padded, ct (d, kp) with kp a multiple of LANES, with half their squared lengths hn (kp; FLT_MAX pads, which
 * therefore never win) and the range [lo[b], hi[b]] of the first values in each block b of LANES centroids.
 * Scanning out from the block of the group's middle point, blocks that cannot beat the best so far along the
 * first value are skipped, so that a group scores the few blocks near it instead of all of them; the answer
 * is exact for rows in any order, the saving comes from sorted ones. Among equally near centroids, any may be
 * returned. */
void asg_nearest_sorted(const float* x, int64_t n, int64_t d, const float* ct, const float* hn, const float* lo,
                        const float* hi, int64_t kp, int64_t* out, int nthreads) {
  _Pragma("omp parallel for schedule(dynamic, 64) num_threads(nthreads)")
  for (int64_t r = 0; r < n; r += GROUP) {
    switch (d) {  /* a constant d unrolls the loops over it */
      case 1: nearest_group(x + r, 1, ct, hn, lo, hi, kp, out + r); break;
      case 2: nearest_group(x + r * 2, 2, ct, hn, lo, hi, kp, out + r); break;
      default: nearest_group(x + r * d, d, ct, hn, lo, hi, kp, out + r);
    }
  }
}

/* The per-segment lookup tables of eq. 2 for one hidden state h (m * ds): out[i, j] = sum_l h[i*ds + l] ct[i, l, j],
 * from the codebooks transposed per segment, ct (m, ds, k) for separate ones (stride ds) or (ds, k) for a shared
 * one (stride 0), so that each step streams a row of k values. */
void asg_segment_scores(const float* h, const float* ct, int64_t m, int64_t k, int64_t ds, int64_t stride, float* out,
                        int nthreads) {
  _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
  for (int64_t i = 0; i < m; i++) {
    float* o = out + i * k;
    memset(o, 0, sizeof(float) * k);
    for (int64_t l = 0; l < ds; l++) {
      const float x = h[i * ds + l];
      const float* c = ct + (i * stride + l) * k;
      for (int64_t j = 0; j < k; j++) o[j] += x * c[j];
    }
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
    if (ds == 2) /* fine segments: two floats are cheaper copied than passed to memcpy */          \
      for (int64_t i = 0; i < m; i++) {                                                             \
        const float* r = codebooks + (i * step + (int64_t)c[i]) * 2;                                \
        o[2 * i] = r[0];                                                                            \
        o[2 * i + 1] = r[1];                                                                        \
      }                                                                                             \
    else                                                                                            \
      for (int64_t i = 0; i < m; i++)                                                               \
        memcpy(o + i * ds, codebooks + (i * step + (int64_t)c[i]) * ds, sizeof(float) * ds);        \
  }                                                                                                 \
}                                                                                                   \
/* The gather's backward: out[i*step + codes[t, i]] += grad[j, i] for t = ids[j] (j when ids is NULL), out    \
 * (rows, ds) zeroed by the caller. Each thread adds its share of the rows into a private copy (thread 0    \
 * into out), so that no two threads write one concept, and the copies are summed at the end. */         \
void asg_scatter_##NAME(const float* grad, const CODE* codes, const int64_t* ids, float* out, int64_t n,    \
                        int64_t m, int64_t ds, int64_t step, int64_t rows, int nthreads) {               \
  int threads = nthreads > 1 ? nthreads : 1;                                                        \
  float* copies = threads > 1 ? (float*)calloc((size_t)(threads - 1) * rows * ds, sizeof(float)) : NULL; \
  if (!copies) threads = 1;                                                                         \
  _Pragma("omp parallel num_threads(threads)")                                                      \
  {                                                                                                 \
    int me = omp_get_thread_num();                                                                  \
    float* acc = me == 0 ? out : copies + (int64_t)(me - 1) * rows * ds;                            \
    _Pragma("omp for schedule(static)")                                                             \
    for (int64_t j = 0; j < n; j++) {                                                               \
      const CODE* c = codes + (ids ? ids[j] : j) * m;                                               \
      const float* g = grad + j * m * ds;                                                           \
      for (int64_t i = 0; i < m; i++) {                                                             \
        float* dst = acc + (i * step + (int64_t)c[i]) * ds;                                         \
        for (int64_t l = 0; l < ds; l++) dst[l] += g[i * ds + l];                                   \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
  for (int t = 1; t < threads; t++) {                                                               \
    const float* part = copies + (int64_t)(t - 1) * rows * ds;                                      \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                              \
    for (int64_t x = 0; x < rows * ds; x++) out[x] += part[x];                                      \
  }                                                                                                 \
  free(copies);                                                                                     \
}

ASG_KERNELS(u8, uint8_t)
ASG_KERNELS(i16, int16_t)
ASG_KERNELS(u16, uint16_t)
ASG_KERNELS(i32, int32_t)

/* Approximate eq. 2 with 8-bit lookup tables, 64 tokens per instruction (AVX-512 VBMI's byte permutes, as
 * faiss's fast-scan PQ does with 4-bit codes): sums[t] = sum_i q[i*kp + code(t, i)] for tokens in blocks of 64,
 * read from an interleaved layout: low[(b*m + i)*64 + j] holds bits 0-7 of the code of token 64b + j in segment
 * i, high[(b*m + i)*(levels - 1) + h] a 64-bit mask of their bit 8 + h (levels > 1). q is (m, kp) uint8 with
 * kp = 128 << levels (levels 0-3: the code bits above the 7 a permute reads; k <= 1024); out[t] = step * sums[t] +
 * offset. Builds without VBMI have no such kernel (asg_byte_lookups() == 0). */
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
int asg_byte_lookups(void) { return 1; }

/* step * (the bytes one block of 64 tokens picks, summed) + offset, into out; a constant `levels` (inlined below)
 * unrolls the loops over chunks and levels and keeps the eight permuted vectors in registers. Each byte picked
 * joins a 16-bit sum of the even or the odd tokens (mask and shift: they spare the port the permutes need), and
 * every 256 segments, before those sums could overflow, they are carried to floats. */
#define PREFETCH_BLOCKS 2 /* blocks ahead whose codes are fetched while this one is summed (past the end: harmless) */
static inline __attribute__((always_inline)) void lut_bytes_block(const uint8_t* q, const uint8_t* low,
                                                                  const uint64_t* high, int64_t b, int64_t m,
                                                                  int64_t levels, float step, float offset,
                                                                  float* out) {
  const int64_t kp = (int64_t)128 << levels;
  const __m512i low_bytes = _mm512_set1_epi16(0x00FF);
  float totals[64] = {0};
  for (int64_t i0 = 0; i0 < m; i0 += 256) {
    const int64_t i1 = i0 + 256 < m ? i0 + 256 : m;
    __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
    for (int64_t i = i0; i < i1; i++) {
      const uint8_t* table = q + i * kp;
      __m512i idx = _mm512_loadu_si512(low + (b * m + i) * 64);
      _mm_prefetch((const char*)(low + ((b + PREFETCH_BLOCKS) * m + i) * 64), _MM_HINT_T0);
      __m512i r[8];
      for (int64_t h = 0; h < ((int64_t)1 << levels); h++)
        r[h] = _mm512_permutex2var_epi8(_mm512_loadu_si512(table + 128 * h), idx, _mm512_loadu_si512(table + 128 * h + 64));
      const uint64_t* bits = high + (b * m + i) * (levels > 1 ? levels - 1 : 0);
      for (int64_t level = 0; level < levels; level++) {  /* bit 7 + level picks one of each pair */
        __mmask64 pick = level ? (__mmask64)bits[level - 1] : _mm512_movepi8_mask(idx);  /* bit 7: the byte's sign */
        for (int64_t h = 0; h < ((int64_t)1 << (levels - level - 1)); h++)
          r[h] = _mm512_mask_blend_epi8(pick, r[2 * h], r[2 * h + 1]);
      }
      even = _mm512_add_epi16(even, _mm512_and_si512(r[0], low_bytes));
      odd = _mm512_add_epi16(odd, _mm512_srli_epi16(r[0], 8));
    }
    uint16_t e[32], o[32];
    _mm512_storeu_si512(e, even);
    _mm512_storeu_si512(o, odd);
    for (int j = 0; j < 32; j++) {
      totals[2 * j] += e[j];
      totals[2 * j + 1] += o[j];
    }
  }
  const __m512 steps = _mm512_set1_ps(step), offsets = _mm512_set1_ps(offset);
  for (int v = 0; v < 4; v++)
    _mm512_storeu_ps(out + b * 64 + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(totals + 16 * v), steps, offsets));
}

/* lut_bytes_block with levels made a constant. */
static void sum_block(const uint8_t* q, const uint8_t* low, const uint64_t* high, int64_t b, int64_t m, int64_t levels,
                      float step, float offset, float* out) {
  switch (levels) {
    case 0: lut_bytes_block(q, low, high, b, m, 0, step, offset, out); return;
    case 1: lut_bytes_block(q, low, high, b, m, 1, step, offset, out); return;
    case 2: lut_bytes_block(q, low, high, b, m, 2, step, offset, out); return;
    default: lut_bytes_block(q, low, high, b, m, 3, step, offset, out); return;
  }
}

void asg_lut_bytes(const uint8_t* q, const uint8_t* low, const uint64_t* high, int64_t blocks, int64_t m,
                   int64_t levels, float step, float offset, float* out, int nthreads) {
  _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
  for (int64_t b = 0; b < blocks; b++) sum_block(q, low, high, b, m, levels, step, offset, out);
}

/* The lanes of the 16 values from index `start` that lie before `end`. */
static inline __mmask16 lanes_before(int64_t start, int64_t end) {
  return start + 16 <= end ? (__mmask16)0xFFFF : start >= end ? 0 : (__mmask16)((1u << (end - start)) - 1);
}

#define NEAR_MAX 65536 /* candidates for exact scoring a thread keeps */
/* Scales block b's scores (scale NULL: none), raises *mine to their largest less its bound where higher, and lists
 * in near those whose score plus bound reaches *mine (counting all, listing while NEAR_MAX allows). */
static inline void list_near(float* out, const float* scale, int64_t b, int64_t vocab, __m512 bounds, float* mine,
                             int32_t* near, int64_t* count) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 x[4], margin[4];
  __mmask16 valid[4];
  __m512 top = _mm512_set1_ps(-FLT_MAX);
  for (int v = 0; v < 4; v++) {
    int64_t t0 = b * 64 + 16 * v;
    valid[v] = lanes_before(t0, vocab);
    x[v] = _mm512_loadu_ps(out + t0);
    margin[v] = bounds;
    if (scale) {
      __m512 s = _mm512_maskz_loadu_ps(valid[v], scale + t0);
      x[v] = _mm512_mul_ps(x[v], s);
      _mm512_storeu_ps(out + t0, x[v]);
      margin[v] = _mm512_mul_ps(bounds, _mm512_abs_ps(s));
    }
    top = _mm512_mask_max_ps(top, valid[v], top, _mm512_sub_ps(x[v], margin[v]));
  }
  float block_top = _mm512_reduce_max_ps(top);
  *mine = block_top > *mine ? block_top : *mine;
  __m512 reach = _mm512_set1_ps(*mine);
  for (int v = 0; v < 4; v++) {
    __mmask16 hit = _mm512_mask_cmp_ps_mask(valid[v], _mm512_add_ps(x[v], margin[v]), reach, _CMP_GE_OQ);
    if (!hit) continue;
    int n = __builtin_popcount(hit);
    if (near && *count + n <= NEAR_MAX)
      _mm512_mask_compressstoreu_epi32(near + *count, hit, _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)(b * 64 + 16 * v))));
    *count += n;
  }
}

/* The code of token j (0-63) of block b in segment i, from the layout above. */
static inline int64_t byte_code(const uint8_t* low, const uint64_t* high, int64_t b, int64_t i, int64_t j,
                                int64_t m, int64_t levels) {
  int64_t code = low[(b * m + i) * 64 + j] & (levels ? 255 : 127);
  for (int64_t h = 1; h < levels; h++) code |= (int64_t)((high[(b * m + i) * (levels - 1) + h - 1] >> j) & 1) << (7 + h);
  return code;
}

/* The smallest and the largest of s[0..k-1] (k >= 1), 16 at a time; a NaN is passed over as the scalar
 * comparisons `s[j] < lo ? s[j] : lo` would (min/max return their second operand, the running value, then). */
static inline void segment_range(const float* s, int64_t k, float* lo, float* hi) {
  __m512 low = _mm512_set1_ps(s[0]), high = low;
  for (int64_t j = 0; j < k; j += 16) {
    __mmask16 valid = lanes_before(j, k);  /* lanes past k keep their running value */
    __m512 v = _mm512_maskz_loadu_ps(valid, s + j);
    low = _mm512_mask_min_ps(low, valid, v, low);
    high = _mm512_mask_max_ps(high, valid, v, high);
  }
  *lo = _mm512_reduce_min_ps(low);
  *hi = _mm512_reduce_max_ps(high);
}

/* row[j] = (s[j] - lo) / step rounded to the nearest integer in 0..255, for j < k, 16 at a time: the same bytes
 * as the scalar (s - lo) / step + 0.5 clamped to 255 (also a NaN: min returns its second operand) then to 0 and
 * truncated. */
static inline void round_segment(const float* s, int64_t k, float lo, float step, uint8_t* row) {
  const __m512 los = _mm512_set1_ps(lo), steps = _mm512_set1_ps(step), half = _mm512_set1_ps(0.5f);
  const __m512 top = _mm512_set1_ps(255.f), zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 16) {
    __mmask16 valid = lanes_before(j, k);
    __m512 v = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + j), los), steps), half);
    v = _mm512_max_ps(_mm512_min_ps(v, top), zero);
    _mm512_mask_cvtepi32_storeu_epi8(row + j, valid, _mm512_cvttps_epi32(v));
  }
}

/* Eq. 2 for one hidden state with the top exact: scores (m, k) float are its per-segment lookup tables, the
 * codes (k <= 128 << levels, every code < k) are in the layout above, scale (vocab; NULL for none) the row scale.
 * 1. Round the tables to bytes with one step for all segments, (score - segment minimum) / step to the nearest
 *    integer, into q (m, 128 << levels), so that each token's sum is within bound = m * step / 2 of eq. 2 (plus
 *    float rounding, which the bound's second term covers).
 * 2. Sum the bytes 64 tokens at a time (lut_bytes_block), scale, and find the largest score less its bound,
 *    listing on the way the tokens whose score plus bound reaches the largest such value seen so far.
 * 3. Score again exactly, in segment order as asg_lut_rows does, every listed token whose score plus its bound
 *    reaches the final largest value: any token that could be the top one.
 * out (blocks * 64) receives the scores; returns the number of tokens scored exactly (-1: out of memory). */
int64_t asg_lut_bytes_top(const float* scores, int64_t k, const uint8_t* low, const uint64_t* high, int64_t blocks,
                          int64_t vocab, int64_t m, int64_t levels, const float* scale, uint8_t* q, float* out,
                          int nthreads) {
  const int64_t kp = (int64_t)128 << levels;
  float* lows = (float*)malloc(sizeof(float) * m);
  if (!lows) return -1;
  double offset = 0., spread = 0., lows_abs = 0.;
  for (int64_t i = 0; i < m; i++) {
    float lo, hi;
    segment_range(scores + i * k, k, &lo, &hi);
    lows[i] = lo;
    offset += lo;
    lows_abs += lo < 0.f ? -lo : lo;
    spread = (double)hi - lo > spread ? (double)hi - lo : spread;
  }
  const float step = spread > 0. ? (float)(spread / 255.) : 1.f;
  for (int64_t i = 0; i < m; i++) {
    round_segment(scores + i * k, k, lows[i], step, q + i * kp);
    memset(q + i * kp + k, 0, (size_t)(kp - k));
  }
  free(lows);
  const float bound = (float)(m * (double)step / 2 * (1 + 1e-4) + 1e-5 * (lows_abs + 255. * m * step));
  const __m512 bounds = _mm512_set1_ps(bound);
  float best = -FLT_MAX;
  int64_t rescored = 0;
  _Pragma("omp parallel num_threads(nthreads)")
  {
    /* The tokens that may end up near the top: those within reach of the best score less its bound seen so
     * far by this thread, which only rises, so that the final candidates are among them. */
    int32_t* near = (int32_t*)malloc(sizeof(int32_t) * NEAR_MAX);
    int64_t count = 0, first_block = blocks, last_block = -1;
    float mine = -FLT_MAX;
    _Pragma("omp for schedule(static) reduction(max: best)")
    for (int64_t b = 0; b < blocks; b++) {
      sum_block(q, low, high, b, m, levels, step, (float)offset, out);
      list_near(out, scale, b, vocab, bounds, &mine, near, &count);
      best = mine > best ? mine : best;
      first_block = b < first_block ? b : first_block;
      last_block = b;
    }
    /* best is every thread's now (the loop's reduction ends in a barrier): score the candidates exactly, or, where
     * they did not fit, every token of this thread's blocks (schedule(static) gives a thread one range of them) */
    int64_t exact = 0, listed = near && count <= NEAR_MAX;
    int64_t first = first_block * 64, last = (last_block + 1) * 64 < vocab ? (last_block + 1) * 64 : vocab;
    for (int64_t c = 0, end = listed ? count : last - first; c < end; c++) {
      int64_t t = listed ? near[c] : first + c;
      float margin = scale ? bound * (scale[t] < 0.f ? -scale[t] : scale[t]) : bound;
      if (out[t] + margin >= best) {
        float acc = 0.f;
        for (int64_t i = 0; i < m; i++) {
          int64_t code = byte_code(low, high, t / 64, i, t % 64, m, levels);
          acc += scores[i * k + (code < k ? code : k - 1)];  /* byte_codes checked them; a layout made by hand may not */
        }
        out[t] = scale ? acc * scale[t] : acc;
        exact++;
      }
    }
    _Pragma("omp atomic")
    rescored += exact;
    free(near);
  }
  return rescored;
}
#else
int asg_byte_lookups(void) { return 0; }
#endif
