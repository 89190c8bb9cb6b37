/* zlocal's int4 and int8 weight-only kernels for x86 CPUs with AVX-512 BF16 (compiled on first use
 * by zlocal/cpu_kernels.py, which also checks their results before any model uses them).
 *
 * Why: decode reads every weight once per token, so it is bound by memory bandwidth. torch's
 * _weight_int4pack_mm_for_cpu streams its weights at about 20 GB/s on a 2-core AVX-512 VM whose RAM
 * gives 30 GB/s; these kernels read one sequential stream per thread, prefetch it, and do the work in
 * bf16 dot products (vdpbf16ps) on codes that are exact in bf16, which keeps them under the memory time.
 *
 * int4 weight layout: tiles of 4 output rows. Tile t holds rows 4t..4t+3 as [K/64][4][32] bytes; in the
 * 32 bytes of (chunk c, row r), byte j holds code 64c+j in its low nibble and 64c+32+j in its high
 * nibble. The codes 0..15 dequantize as (q - 8) * scale + zero per group of G inputs (torch's
 * convention). Scales and zeros are tiled the same way, [N/4][K/G][4][2] bf16, so each thread reads
 * them as a second sequential stream (torch's [K/G][N][2] would be K/G streams, one per group).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#define ROWS 4             /* output rows per tile */
#define PREFETCH 512       /* bytes ahead in the tile's stream (measured best of 256..2048) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* bf16 of 0..15, twice: vpermw reads the low 5 bits of each word, so a word holding a whole byte
   (or a byte shifted right by 4) indexes the right value without masking */
#define BF16_CODES _mm512_set_epi16( \
    0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, \
    0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, \
    0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, \
    0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000)

/* The 64 codes of one chunk of row r, as bf16: low half (codes 0..31) and high half (32..63). */
#define DECODE(chunk, r, w_lo, w_hi)                                                                \
    __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)((chunk) + (r) * 32))); \
    __m512i w_lo = _mm512_permutexvar_epi16(bytes, table);                                          \
    __m512i w_hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table)

static inline void prefetch_chunk(const uint8_t *chunk) {
    for (int b = 0; b < ROWS * 32; b += 64) _mm_prefetch((const char *)(chunk + PREFETCH + b), _MM_HINT_T0);
}

/* Each tile's scales and zeros are expanded once per call into floats: the scales, [group][row], for
   the dot-product loops (one broadcast multiply-add per group and row), and the zero-point terms
   zero - 8 * scale, whose dot product with the group sums of x is the rest of each output. Doing
   this with vector instructions, not per group inside the loops, is what keeps int4 at memory speed
   with groups of 64 (the per-group scalar work cost as much as the dot products). */
/* 8 (scale, zero) bf16 pairs -> the scales and zeros as floats, in lanes 0-7 (8-15 repeat them). */
static inline void scale_pairs(const uint16_t *sz, __m512 *s, __m512 *z) {
    const __m512i even = _mm512_set_epi32(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 15, 13, 11, 9, 7, 5, 3, 1);
    __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)sz));
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
    *s = _mm512_permutexvar_ps(even, v);
    *z = _mm512_permutexvar_ps(odd, v);
}

static void tile_scales(const uint16_t *sz, int count, float *scale, float *zterm) {
    int i = 0;
    for (; i + 8 <= count; i += 8) {
        __m512 s, z;
        scale_pairs(sz + 2 * i, &s, &z);
        _mm256_storeu_ps(scale + i, _mm512_castps512_ps256(s));
        _mm256_storeu_ps(zterm + i, _mm512_castps512_ps256(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z)));
    }
    for (; i < count; i++) {
        scale[i] = bf16_to_f32(sz[2 * i]);
        zterm[i] = bf16_to_f32(sz[2 * i + 1]) - 8.f * scale[i];
    }
}

/* One token: the scales as floats and the zero-point offsets directly, without storing the terms
   (less to keep in L1 beside x and the weight stream: 3-10% faster with 8192+ inputs). */
static void tile_scales_offsets(const uint16_t *sz, int groups, const float *xsum, float *scale, float out[ROWS]) {
    const __m512i expand = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    const int count = groups * ROWS;
    int i = 0;
    for (; i + 8 <= count; i += 8) { /* two groups */
        __m512 s, z;
        scale_pairs(sz + 2 * i, &s, &z);
        _mm256_storeu_ps(scale + i, _mm512_castps512_ps256(s));
        __m128 two = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xsum + i / ROWS))); /* g, g + 1 */
        __m512 xs = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(two));
        acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z), xs, acc);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, acc);
    for (int r = 0; r < ROWS; r++) out[r] = lanes[r] + lanes[r + 4];
    for (; i < count; i++) {
        scale[i] = bf16_to_f32(sz[2 * i]);
        out[i % ROWS] += (bf16_to_f32(sz[2 * i + 1]) - 8.f * scale[i]) * xsum[i / ROWS];
    }
}

/* out[r] = sum over groups of zterm[g][r] * xsum[g], for the tile's rows. */
static void tile_offsets(const float *zterm, const float *xsum, int groups, float out[ROWS]) {
    const __m512i expand = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    int g = 0;
    for (; g + 4 <= groups; g += 4) {
        __m512 xs = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(_mm_loadu_ps(xsum + g)));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(zterm + g * ROWS), xs, acc);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, acc);
    for (int r = 0; r < ROWS; r++) out[r] = lanes[r] + lanes[r + 4] + lanes[r + 8] + lanes[r + 12];
    for (; g < groups; g++)
        for (int r = 0; r < ROWS; r++) out[r] += zterm[g * ROWS + r] * xsum[g];
}

/* One tile (ROWS output rows) for one row of x, groups of 64 or more codes. */
static void tile_dot(const uint16_t *x, const uint8_t *tile, const float *scale, const float *offset,
                     uint16_t *y, int n, int K, int G) {
    const __m512i table = BF16_CODES;
    const int groups = K / G;
    __m512 total[ROWS];
    for (int r = 0; r < ROWS; r++) total[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int k = g * G; k < (g + 1) * G; k += 64) {
            const uint8_t *chunk = tile + (size_t)(k / 64) * (ROWS * 32);
            prefetch_chunk(chunk);
            __m512bh x_lo = (__m512bh)_mm512_loadu_si512(x + k);
            __m512bh x_hi = (__m512bh)_mm512_loadu_si512(x + k + 32);
            for (int r = 0; r < ROWS; r++) {
                DECODE(chunk, r, w_lo, w_hi);
                acc[r] = _mm512_dpbf16_ps(acc[r], x_lo, (__m512bh)w_lo);
                acc[r] = _mm512_dpbf16_ps(acc[r], x_hi, (__m512bh)w_hi);
            }
        }
        for (int r = 0; r < ROWS; r++)
            total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(scale[g * ROWS + r]), total[r]);
    }
    for (int r = 0; r < ROWS; r++) y[n + r] = f32_to_bf16(_mm512_reduce_add_ps(total[r]) + offset[r]);
}

/* tile_dot for two adjacent tiles at once, sharing each load of x: with long rows (down_proj's
   14336 inputs) x no longer stays in L1 beside the weight stream, and reading it once per 8 rows
   instead of 4 made that shape 15-20% faster (it made 4096-wide ones slower). */
static void tile_pair_dot(const uint16_t *x, const uint8_t *tile, const float *scale, const float *offset,
                          uint16_t *y, int n, int K, int G) {
    const __m512i table = BF16_CODES;
    const int groups = K / G;
    const uint8_t *tiles[2] = {tile, tile + (size_t)ROWS * (K / 2)};
    __m512 total[2 * ROWS];
    for (int r = 0; r < 2 * ROWS; r++) total[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 acc[2 * ROWS];
        for (int r = 0; r < 2 * ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int k = g * G; k < (g + 1) * G; k += 64) {
            const uint8_t *chunks[2] = {tiles[0] + (size_t)(k / 64) * (ROWS * 32),
                                        tiles[1] + (size_t)(k / 64) * (ROWS * 32)};
            prefetch_chunk(chunks[0]);
            prefetch_chunk(chunks[1]);
            __m512bh x_lo = (__m512bh)_mm512_loadu_si512(x + k);
            __m512bh x_hi = (__m512bh)_mm512_loadu_si512(x + k + 32);
            for (int r = 0; r < 2 * ROWS; r++) {
                DECODE(chunks[r / ROWS], r % ROWS, w_lo, w_hi);
                acc[r] = _mm512_dpbf16_ps(acc[r], x_lo, (__m512bh)w_lo);
                acc[r] = _mm512_dpbf16_ps(acc[r], x_hi, (__m512bh)w_hi);
            }
        }
        for (int r = 0; r < 2 * ROWS; r++) {
            const float s = scale[(r / ROWS) * groups * ROWS + g * ROWS + r % ROWS];
            total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(s), total[r]);
        }
    }
    for (int r = 0; r < 2 * ROWS; r++) y[n + r] = f32_to_bf16(_mm512_reduce_add_ps(total[r]) + offset[r]);
}

/* The same for groups of 32: the two halves of each chunk are two groups. */
static void tile_dot_g32(const uint16_t *x, const uint8_t *tile, const float *scale, const float *offset,
                         uint16_t *y, int n, int K) {
    const __m512i table = BF16_CODES;
    __m512 total[ROWS];
    for (int r = 0; r < ROWS; r++) total[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 64) {
        const uint8_t *chunk = tile + (size_t)(k / 64) * (ROWS * 32);
        prefetch_chunk(chunk);
        __m512bh x_lo = (__m512bh)_mm512_loadu_si512(x + k);
        __m512bh x_hi = (__m512bh)_mm512_loadu_si512(x + k + 32);
        const float *s_lo = scale + (k / 32) * ROWS, *s_hi = s_lo + ROWS;
        for (int r = 0; r < ROWS; r++) {
            DECODE(chunk, r, w_lo, w_hi);
            __m512 a_lo = _mm512_dpbf16_ps(_mm512_setzero_ps(), x_lo, (__m512bh)w_lo);
            __m512 a_hi = _mm512_dpbf16_ps(_mm512_setzero_ps(), x_hi, (__m512bh)w_hi);
            total[r] = _mm512_fmadd_ps(a_lo, _mm512_set1_ps(s_lo[r]), total[r]);
            total[r] = _mm512_fmadd_ps(a_hi, _mm512_set1_ps(s_hi[r]), total[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) y[n + r] = f32_to_bf16(_mm512_reduce_add_ps(total[r]) + offset[r]);
}

/* Per-(token, row) scaled group sums of the MB-token functions. */
#define MB 4
typedef struct {
    __m512 total[MB][ROWS];
} Sums;

static inline void sums_init(Sums *s) {
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < ROWS; r++) s->total[m][r] = _mm512_setzero_ps();
}

/* Add one group's dot products (acc) times its scales (the tile's ROWS scales for that group). */
static inline void sums_add_group(Sums *s, __m512 acc[MB][ROWS], const float *scale) {
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < MB; m++)
            s->total[m][r] = _mm512_fmadd_ps(acc[m][r], _mm512_set1_ps(scale[r]), s->total[m][r]);
}

static inline void sums_store(const Sums *s, const float *zterm, const float *xsum, int groups, uint16_t *y,
                              int N, int n) {
    for (int m = 0; m < MB; m++) {
        float offset[ROWS];
        tile_offsets(zterm, xsum + m * groups, groups, offset);
        for (int r = 0; r < ROWS; r++)
            y[(size_t)m * N + n + r] = f32_to_bf16(_mm512_reduce_add_ps(s->total[m][r]) + offset[r]);
    }
}

/* MB rows of x at once (prompts): each chunk's codes are decoded once and used MB times, so prompt
   processing costs dot products rather than decoding. Groups of 64 or more codes. */
static void tile_dot_rows(const uint16_t *x, const uint8_t *tile, const float *scale, const float *zterm,
                          const float *xsum, uint16_t *y, int n, int N, int K, int G) {
    const __m512i table = BF16_CODES;
    const int groups = K / G;
    Sums sums;
    sums_init(&sums);
    for (int g = 0; g < groups; g++) {
        __m512 acc[MB][ROWS];
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_setzero_ps();
        for (int k = g * G; k < (g + 1) * G; k += 64) {
            const uint8_t *chunk = tile + (size_t)(k / 64) * (ROWS * 32);
            __m512bh x_lo[MB], x_hi[MB];
            for (int m = 0; m < MB; m++) {
                x_lo[m] = (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k);
                x_hi[m] = (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k + 32);
            }
            for (int r = 0; r < ROWS; r++) {
                DECODE(chunk, r, w_lo, w_hi);
                for (int m = 0; m < MB; m++) {
                    acc[m][r] = _mm512_dpbf16_ps(acc[m][r], x_lo[m], (__m512bh)w_lo);
                    acc[m][r] = _mm512_dpbf16_ps(acc[m][r], x_hi[m], (__m512bh)w_hi);
                }
            }
        }
        sums_add_group(&sums, acc, scale + g * ROWS);
    }
    sums_store(&sums, zterm, xsum, groups, y, N, n);
}

/* tile_dot_rows for groups of 32: each half of a chunk is a group of its own. */
static void tile_dot_rows_g32(const uint16_t *x, const uint8_t *tile, const float *scale, const float *zterm,
                              const float *xsum, uint16_t *y, int n, int N, int K) {
    const __m512i table = BF16_CODES;
    const int groups = K / 32;
    Sums sums;
    sums_init(&sums);
    for (int k = 0; k < K; k += 64) {
        const uint8_t *chunk = tile + (size_t)(k / 64) * (ROWS * 32);
        for (int h = 0; h < 2; h++) {
            __m512 acc[MB][ROWS];
            __m512bh xh[MB];
            for (int m = 0; m < MB; m++) xh[m] = (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k + 32 * h);
            for (int r = 0; r < ROWS; r++) {
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(chunk + r * 32)));
                __m512i wv = _mm512_permutexvar_epi16(h ? _mm512_srli_epi16(bytes, 4) : bytes, table);
                for (int m = 0; m < MB; m++) acc[m][r] = _mm512_dpbf16_ps(_mm512_setzero_ps(), xh[m], (__m512bh)wv);
            }
            sums_add_group(&sums, acc, scale + (k / 32 + h) * ROWS);
        }
    }
    sums_store(&sums, zterm, xsum, groups, y, N, n);
}

/* The sums of x over each group of G inputs (G % 16 == 0), for the zero-point offsets. */
static void group_sums(const uint16_t *x, int K, int G, float *xsum) {
    for (int g = 0; g < K / G; g++) {
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < G; j += 16) {
            __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + g * G + j)));
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
        }
        xsum[g] = _mm512_reduce_add_ps(acc);
    }
}

/* One token: rows 4t.. of y (or 4t.. and 4t+4.. with pair == 2) from tile t of the int4 weight. */
static void int4_tile_m1(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y,
                         int t, int pair, int K, int G, const float *xsum) {
    const int groups = K / G;
    const uint8_t *tile = w + (size_t)t * ROWS * (K / 2);
    float scale[2 * groups * ROWS], offset[2 * ROWS];
    for (int p = 0; p < pair; p++)
        tile_scales_offsets(sz + (size_t)(t + p) * groups * ROWS * 2, groups, xsum,
                            scale + p * groups * ROWS, offset + p * ROWS);
    if (pair == 2)
        tile_pair_dot(x, tile, scale, offset, y, t * ROWS, K, G);
    else if (G == 32)
        tile_dot_g32(x, tile, scale, offset, y, t * ROWS, K);
    else
        tile_dot(x, tile, scale, offset, y, t * ROWS, K, G);
}

/* one token, long rows, groups of 64+: tiles go in pairs that share each load of x (tile_pair_dot) */
static inline int int4_pairing(int M, int N, int K, int G) {
    return M == 1 && K > 8192 && G != 32 && (N / ROWS) % 2 == 0 ? 2 : 1;
}

/* y[M][N] (bf16) = x[M][K] (bf16) times the int4 weight. Needs N % 4 == 0, K % 64 == 0,
 * G == 32 or G % 64 == 0, and K % G == 0. Returns 0, or -1 when out of memory. */
int zl_int4_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y,
               int M, int N, int K, int G, int threads) {
    const int groups = K / G;
    float small[512];  /* group sums of x: on the stack for one token, else on the heap */
    float *xsum = (size_t)M * groups <= 512 ? small : malloc(sizeof(float) * (size_t)M * groups);
    if (xsum == NULL) return -1;
    for (int m = 0; m < M; m++) group_sums(x + (size_t)m * K, K, G, xsum + m * groups);
    const int tiles = N / ROWS;
    const int pair = int4_pairing(M, N, K, G);
    /* static schedule: each thread reads one contiguous run of tiles, which the prefetcher follows */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t += pair) {
        if (M == 1) {
            int4_tile_m1(x, w, sz, y, t, pair, K, G, xsum);
            continue;
        }
        const uint8_t *tile = w + (size_t)t * ROWS * (K / 2);
        float scale[groups * ROWS], zterm[groups * ROWS];
        tile_scales(sz + (size_t)t * groups * ROWS * 2, groups * ROWS, scale, zterm);
        int m = 0;
        for (; m + MB <= M; m += MB) {
            const float *xs = xsum + m * groups;
            if (G == 32)
                tile_dot_rows_g32(x + (size_t)m * K, tile, scale, zterm, xs, y + (size_t)m * N, t * ROWS, N, K);
            else
                tile_dot_rows(x + (size_t)m * K, tile, scale, zterm, xs, y + (size_t)m * N, t * ROWS, N, K, G);
        }
        for (; m < M; m++) {
            float offset[ROWS];
            tile_offsets(zterm, xsum + m * groups, groups, offset);
            if (G == 32)
                tile_dot_g32(x + (size_t)m * K, tile, scale, offset, y + (size_t)m * N, t * ROWS, K);
            else
                tile_dot(x + (size_t)m * K, tile, scale, offset, y + (size_t)m * N, t * ROWS, K, G);
        }
    }
    if (xsum != small) free(xsum);
    return 0;
}

/* int8: weights in tiles of 4 rows, [N/4][K/64][4][64] int8, per-row bf16 scales.
 * y[m][n] = scale[n] * sum_k x[m][k] * q[n][k]. A code v = 16 * (v >> 4) + (v & 15): both parts come
 * from 16-entry tables as exact bf16, so each 32 codes take two dot products and no conversions. */
/* bf16(v & 15), indexed by the low 5 bits of the word */
#define INT8_LOW BF16_CODES
/* bf16(16 * (v >> 4)): the arithmetic shift leaves -8..7, whose low 5 bits index 24..31 and 0..7 */
#define INT8_HIGH _mm512_set_epi16( \
    0xC180, 0xC200, 0xC240, 0xC280, 0xC2A0, 0xC2C0, 0xC2E0, 0xC300, 0, 0, 0, 0, 0, 0, 0, 0, \
    0, 0, 0, 0, 0, 0, 0, 0, 0x42E0, 0x42C0, 0x42A0, 0x4280, 0x4240, 0x4200, 0x4180, 0x0000)

/* Rows 4t..4t+3 of y (one row of x) from tile t of the int8 weight. */
static void int8_tile(const uint16_t *xm, const int8_t *w, const uint16_t *scales, uint16_t *ym, int t, int K) {
    const __m512i low = INT8_LOW, high = INT8_HIGH;
    const int8_t *tile = w + (size_t)t * ROWS * K;
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
    }
    for (int k = 0; k < K; k += 64) {
        const int8_t *chunk = tile + (size_t)k * ROWS;
        for (int b = 0; b < ROWS * 64; b += 64) _mm_prefetch((const char *)(chunk + PREFETCH + b), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + k + 32 * h);
            for (int r = 0; r < ROWS; r++) {
                __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(chunk + r * 64 + 32 * h)));
                __m512i lo = _mm512_permutexvar_epi16(v, low);
                __m512i hi = _mm512_permutexvar_epi16(_mm512_srai_epi16(v, 4), high);
                acc[r][h] = _mm512_dpbf16_ps(acc[r][h], xv, (__m512bh)lo);
                acc[r][h] = _mm512_dpbf16_ps(acc[r][h], xv, (__m512bh)hi);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        ym[t * ROWS + r] = f32_to_bf16(sum * bf16_to_f32(scales[t * ROWS + r]));
    }
}

void zl_int8_mm(const uint16_t *x, const int8_t *w, const uint16_t *scales, uint16_t *y,
                int M, int N, int K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N / ROWS; t++)
        for (int m = 0; m < M; m++) int8_tile(x + (size_t)m * K, w, scales, y + (size_t)m * N, t, K);
}

/* ---- One decode step of a Llama/Mistral decoder stack, for one token ----
 *
 * Why: a 135M model's layer does ~2 MB of weight reads but ~40 small torch ops, so in Python most of a
 * token is dispatch overhead. Here every layer runs in one OpenMP region: the projections on the
 * kernels above, the rest (RMSNorm, rotary embedding, KV-cache write, attention, SiLU) in between, with
 * the rounding points of zlocal's torch forward (each torch op on bf16 computes in fp32 and rounds its
 * output to bf16; attention mirrors PyTorch's CPU flash kernel: blocks of 512 keys, online softmax,
 * probabilities rounded to bf16 before the product with V). */

typedef struct {
    int bits;                 /* 4: int4 (pack_int4 layout), 8: int8 (pack_int8 layout) */
    int N, K, G;
    const void *w;
    const uint16_t *s;        /* int4: tiled scales and zeros; int8: per-row scales */
} ZlMat;

typedef struct {
    const uint16_t *w_in, *w_post;   /* RMSNorm weights [hidden] */
    float eps_in, eps_post;
    ZlMat qkv, o, gate_up, down;     /* q/k/v and gate/up fused along the outputs */
    uint16_t *k_cache, *v_cache;     /* [kv_heads][max_tokens][head_dim] */
} ZlLayer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, max_tokens, window;
    float scale;                     /* attention scale */
} ZlDims;

#define KV_BLOCK 512

static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Called by every thread of a parallel region: y = W x, tiles split statically between the threads. */
static void mat_vec(const ZlMat *m, const uint16_t *x, uint16_t *y) {
    if (m->bits == 8) {
        #pragma omp for schedule(static)
        for (int t = 0; t < m->N / ROWS; t++) int8_tile(x, (const int8_t *)m->w, m->s, y, t, m->K);
        return;
    }
    float xsum[m->K / m->G];
    group_sums(x, m->K, m->G, xsum);
    const int pair = int4_pairing(1, m->N, m->K, m->G);
    #pragma omp for schedule(static)
    for (int t = 0; t < m->N / ROWS; t += pair)
        int4_tile_m1(x, (const uint8_t *)m->w, m->s, y, t, pair, m->K, m->G, xsum);
}

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)), as zlocal's torch RMSNorm rounds it */
static void rms_norm(const uint16_t *x, const uint16_t *w, float eps, int n, uint16_t *out) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = load_bf16x16(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) ss += bf16_to_f32(x[i]) * bf16_to_f32(x[i]);
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++)
        out[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * r)));
}

/* x * cos + roll(x, d/2) * sin, each product and the sum rounded to bf16 (sin's first half negated) */
static void rope(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int d) {
    uint16_t in[256];
    memcpy(in, x, sizeof(uint16_t) * d);
    const int half = d / 2;
    for (int i = 0; i < d; i++) {
        float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(in[i]) * bf16_to_f32(cos[i])));
        float b = bf16_to_f32(f32_to_bf16(bf16_to_f32(in[(i + half) % d]) * bf16_to_f32(sin[i])));
        x[i] = f32_to_bf16(a + b);
    }
}

/* e^x for x <= 0 (softmax terms), 16 lanes: 2^n * P(r) with r = x - n ln2 in [-ln2/2, ln2/2] and P the
   degree-6 Taylor polynomial (relative error below 2e-7, a few fp32 ulps; the result is rounded to
   bf16 before use). */
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f)); /* e^-104 is below fp32's smallest value */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* One query head over keys lo..end-1 of its K/V head; d % 16 == 0, d <= 256. */
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int lo, int end, int d,
                   float scale, float *scores, uint16_t *out) {
    __m512 acc[16];
    __m512bh qv[8];
    const int vecs = d / 16, pairs = (d + 31) / 32;
    for (int v = 0; v < vecs; v++) acc[v] = _mm512_setzero_ps();
    for (int c = 0; c < pairs; c++) /* a last 16 dims read as 32 with the upper half zeroed */
        qv[c] = (__m512bh)_mm512_maskz_loadu_epi16(d - 32 * c >= 32 ? 0xFFFFFFFFu : 0xFFFFu, q + 32 * c);
    float max = -INFINITY, sum = 0.f;
    for (int n0 = lo; n0 < end; n0 += KV_BLOCK) {
        const int nb = end - n0 < KV_BLOCK ? end - n0 : KV_BLOCK;
        float bmax = -INFINITY;
        for (int j = 0; j < nb; j++) {
            const uint16_t *k = keys + (size_t)(n0 + j) * d;
            __m512 dot = _mm512_setzero_ps();
            for (int c = 0; c < pairs; c++)
                dot = _mm512_dpbf16_ps(dot, qv[c],
                                       (__m512bh)_mm512_maskz_loadu_epi16(d - 32 * c >= 32 ? 0xFFFFFFFFu : 0xFFFFu,
                                                                          k + 32 * c));
            scores[j] = _mm512_reduce_add_ps(dot) * scale;
            if (scores[j] > bmax) bmax = scores[j];
        }
        const float new_max = bmax > max ? bmax : max;
        __m512 bsum = _mm512_setzero_ps();
        for (int j = 0; j < nb; j += 16) {
            const __mmask16 live = nb - j >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
            __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + j), _mm512_set1_ps(new_max)));
            e = _mm512_maskz_mov_ps(live, e);
            bsum = _mm512_add_ps(bsum, e);
            /* the probabilities meet V in bf16 (round to nearest even), as in PyTorch's kernel */
            __m256i rounded = (__m256i)_mm512_cvtneps_pbh(e);
            _mm512_mask_storeu_ps(scores + j, live,
                                  _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
        }
        const float correction = expf(max - new_max); /* 0 for the first block */
        sum = _mm512_reduce_add_ps(bsum) + correction * sum;
        max = new_max;
        if (n0 > lo)
            for (int v = 0; v < vecs; v++) acc[v] = _mm512_mul_ps(acc[v], _mm512_set1_ps(correction));
        for (int j = 0; j < nb; j++) {
            const uint16_t *val = values + (size_t)(n0 + j) * d;
            const __m512 p = _mm512_set1_ps(scores[j]);
            for (int v = 0; v < vecs; v++) acc[v] = _mm512_fmadd_ps(p, load_bf16x16(val + 16 * v), acc[v]);
        }
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int v = 0; v < vecs; v++) {
        float o[16];
        _mm512_storeu_ps(o, _mm512_mul_ps(acc[v], inv));
        for (int i = 0; i < 16; i++) out[16 * v + i] = f32_to_bf16(o[i]);
    }
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* h [hidden] bf16, the token's embedding, becomes the last layer's output (before the final norm).
 * cos/sin: the rotary rows of position pos. The caches get position pos; attention reads positions
 * max(0, pos + 1 - window)..pos. Returns 0, or -1 when out of memory. */
int zl_decode_layers(const ZlDims *d, const ZlLayer *layers, uint16_t *h, int pos,
                     const uint16_t *cos, const uint16_t *sin, int threads) {
    const int H = d->hidden, hd = d->head_dim, nq = d->heads, nkv = d->kv_heads, I = d->inter;
    const int end = pos + 1, lo = d->window > 0 && end > d->window ? end - d->window : 0;
    const size_t qkv_n = (size_t)(nq + 2 * nkv) * hd;
    uint16_t *buf = malloc(sizeof(uint16_t) * (2 * (size_t)H + qkv_n + (size_t)nq * hd + 3 * (size_t)I));
    float *scores = malloc(sizeof(float) * KV_BLOCK * (size_t)threads);
    if (buf == NULL || scores == NULL) {
        free(buf);
        free(scores);
        return -1;
    }
    uint16_t *xn = buf, *tmp = xn + H, *qkv = tmp + H, *att = qkv + qkv_n, *gu = att + (size_t)nq * hd;
    uint16_t *act = gu + 2 * (size_t)I;
    #pragma omp parallel num_threads(threads)
    {
        float *my_scores = scores + KV_BLOCK * (size_t)omp_get_thread_num();
        for (int l = 0; l < d->layers; l++) {
            const ZlLayer *L = layers + l;
            #pragma omp single
            rms_norm(h, L->w_in, L->eps_in, H, xn);
            mat_vec(&L->qkv, xn, qkv);
            #pragma omp for schedule(static)
            for (int head = 0; head < nq + nkv; head++) {
                uint16_t *x = qkv + (size_t)head * hd;
                rope(x, cos, sin, hd);
                if (head >= nq) {
                    const size_t at = ((size_t)(head - nq) * d->max_tokens + pos) * hd;
                    memcpy(L->k_cache + at, x, sizeof(uint16_t) * hd);
                    memcpy(L->v_cache + at, x + (size_t)nkv * hd, sizeof(uint16_t) * hd);
                }
            }
            #pragma omp for schedule(static)
            for (int head = 0; head < nq; head++) {
                const size_t kv = (size_t)(head / (nq / nkv)) * d->max_tokens * hd;
                attend(qkv + (size_t)head * hd, L->k_cache + kv, L->v_cache + kv, lo, end, hd, d->scale,
                       my_scores, att + (size_t)head * hd);
            }
            mat_vec(&L->o, att, tmp);
            #pragma omp single
            {
                for (int i = 0; i < H; i++) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(tmp[i]));
                rms_norm(h, L->w_post, L->eps_post, H, xn);
            }
            mat_vec(&L->gate_up, xn, gu);
            #pragma omp for schedule(static)
            for (int i = 0; i < I; i++) {
                const float g = bf16_to_f32(f32_to_bf16(silu(bf16_to_f32(gu[i]))));
                act[i] = f32_to_bf16(g * bf16_to_f32(gu[I + i]));
            }
            mat_vec(&L->down, act, tmp);
            #pragma omp single
            for (int i = 0; i < H; i++) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(tmp[i]));
        }
    }
    free(buf);
    free(scores);
    return 0;
}
