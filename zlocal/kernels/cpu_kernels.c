/* zlocal's int4 and int8 weight-only kernels for x86 CPUs with AVX-512 BF16 (decode.c builds a one-token
 * step of a whole Llama/Mistral decoder stack on them; both are compiled on first use
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
#include "cpu_kernels.h"

/* bf16 of 0..15, twice: vpermw reads the low 5 bits of each word, so a word holding a whole byte
   (or a byte shifted right by 4) indexes the right value without masking */
#define BF16_CODES _mm512_set_epi16( \
    0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, \
    0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, \
    0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, \
    0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000)

/* The code table as vpermw reads it: 16 bf16 values twice. ``codes`` holds the 16 values a code
   0..15 stands for (bitsandbytes' NF4/FP4 tables, say), or is NULL for the integers 0..15. Any table
   keeps the kernels' arithmetic: w = table[q] * scale + (zero - 8 * scale) per group. */
__m512i zl_code_table(const uint16_t *codes) {
    if (codes == NULL) return BF16_CODES;
    const __m256i once = _mm256_loadu_si256((const __m256i *)codes);
    return _mm512_inserti64x4(_mm512_castsi256_si512(once), once, 1);
}

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
                     uint16_t *y, int n, int K, int G, __m512i table) {
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
                          uint16_t *y, int n, int K, int G, __m512i table) {
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
                         uint16_t *y, int n, int K, __m512i table) {
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
                          const float *xsum, uint16_t *y, int n, int N, int K, int G, __m512i table) {
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
                              const float *xsum, uint16_t *y, int n, int N, int K, __m512i table) {
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

void zl_group_sums(const uint16_t *x, int K, int G, float *xsum) {
    for (int g = 0; g < K / G; g++) {
        __m512 acc = _mm512_setzero_ps();
        for (int j = 0; j < G; j += 16) {
            __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + g * G + j)));
            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
        }
        xsum[g] = _mm512_reduce_add_ps(acc);
    }
}

void zl_int4_tile_m1(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y,
                     int t, int pair, int K, int G, const float *xsum, __m512i table) {
    const int groups = K / G;
    const uint8_t *tile = w + (size_t)t * ROWS * (K / 2);
    float scale[2 * groups * ROWS], offset[2 * ROWS];
    for (int p = 0; p < pair; p++)
        tile_scales_offsets(sz + (size_t)(t + p) * groups * ROWS * 2, groups, xsum,
                            scale + p * groups * ROWS, offset + p * ROWS);
    if (pair == 2)
        tile_pair_dot(x, tile, scale, offset, y, t * ROWS, K, G, table);
    else if (G == 32)
        tile_dot_g32(x, tile, scale, offset, y, t * ROWS, K, table);
    else
        tile_dot(x, tile, scale, offset, y, t * ROWS, K, G, table);
}

/* one token, long rows, groups of 64+: tiles go in pairs that share each load of x (tile_pair_dot) */
int zl_int4_pairing(int M, int N, int K, int G) {
    return M == 1 && K > 8192 && G != 32 && (N / ROWS) % 2 == 0 ? 2 : 1;
}

/* The shapes the int4 tiles support: N % 4 == 0, K % 64 == 0, G == 32 or G % 64 == 0, K % G == 0, and at
 * most MAX_GROUPS groups per row (per-group scales live in stack arrays). cpu_kernels.supports_int4 states
 * the same on the Python side; each entry point checks again. */
int zl_int4_shape_ok(int N, int K, int G) {
    return N > 0 && K > 0 && N % ROWS == 0 && K % 64 == 0 && (G == 32 || (G > 0 && G % 64 == 0)) && K % G == 0
        && K / G <= MAX_GROUPS;
}

int zl_int8_shape_ok(int N, int K) { return N > 0 && K > 0 && N % ROWS == 0 && K % 64 == 0; }

/* y[M][N] (bf16) = x[M][K] (bf16) times the int4 weight (``codes``: see zl_code_table). Returns 0, -1 when out of memory, or
 * ZL_EBADSHAPE for a shape outside zl_int4_shape_ok (nothing is read or written then). */
int zl_int4_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, const uint16_t *codes, uint16_t *y,
               int M, int N, int K, int G, int threads) {
    if (M < 1 || threads < 1 || !zl_int4_shape_ok(N, K, G) || !x || !w || !sz || !y) return ZL_EBADSHAPE;
    const int groups = K / G;
    float small[512];  /* group sums of x: on the stack for one token, else on the heap */
    float *xsum = (size_t)M * groups <= 512 ? small : malloc(sizeof(float) * (size_t)M * groups);
    if (xsum == NULL) return -1;
    for (int m = 0; m < M; m++) zl_group_sums(x + (size_t)m * K, K, G, xsum + m * groups);
    const int tiles = N / ROWS;
    const int pair = zl_int4_pairing(M, N, K, G);
    const __m512i table = zl_code_table(codes);
    /* static schedule: each thread reads one contiguous run of tiles, which the prefetcher follows */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t += pair) {
        if (M == 1) {
            zl_int4_tile_m1(x, w, sz, y, t, pair, K, G, xsum, table);
            continue;
        }
        const uint8_t *tile = w + (size_t)t * ROWS * (K / 2);
        float scale[groups * ROWS], zterm[groups * ROWS];
        tile_scales(sz + (size_t)t * groups * ROWS * 2, groups * ROWS, scale, zterm);
        int m = 0;
        for (; m + MB <= M; m += MB) {
            const float *xs = xsum + m * groups;
            if (G == 32)
                tile_dot_rows_g32(x + (size_t)m * K, tile, scale, zterm, xs, y + (size_t)m * N, t * ROWS, N, K, table);
            else
                tile_dot_rows(x + (size_t)m * K, tile, scale, zterm, xs, y + (size_t)m * N, t * ROWS, N, K, G, table);
        }
        for (; m < M; m++) {
            float offset[ROWS];
            tile_offsets(zterm, xsum + m * groups, groups, offset);
            if (G == 32)
                tile_dot_g32(x + (size_t)m * K, tile, scale, offset, y + (size_t)m * N, t * ROWS, K, table);
            else
                tile_dot(x + (size_t)m * K, tile, scale, offset, y + (size_t)m * N, t * ROWS, K, G, table);
        }
    }
    if (xsum != small) free(xsum);
    return 0;
}

/* Rows of the int4 weight as bf16, w = table[q] * scale + (zero - 8 * scale) in fp32, rounded once (to nearest
 * even) to bf16: the block-wise prompt path multiplies these with oneDNN's bf16 GEMM. w and sz start at
 * a tile; rows % 4 == 0; out is [rows][K]. One pass, vectorized: the torch ops it replaces (unpack,
 * subtract, scale, shift) took longer than the GEMM itself. */
int zl_int4_dequant(const uint8_t *w, const uint16_t *sz, const uint16_t *codes, uint16_t *out, int rows, int K,
                    int G, int threads) {
    if (threads < 1 || !zl_int4_shape_ok(rows, K, G) || !w || !sz || !out) return ZL_EBADSHAPE;
    const int groups = K / G, tiles = rows / ROWS;
    /* the table's 16 values as floats, looked up by each code's 32-bit lane */
    const __m512 values = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(zl_code_table(codes))), 16));
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        const uint8_t *tile = w + (size_t)t * ROWS * (K / 2);
        const uint16_t *tsz = sz + (size_t)t * groups * ROWS * 2;
        for (int c = 0; c < K / 64; c++) {
            const uint8_t *chunk = tile + (size_t)c * ROWS * 32;
            for (int r = 0; r < ROWS; r++) {
                uint16_t *o = out + (size_t)(t * ROWS + r) * K + c * 64;
                /* codes 0..31 (low nibbles) and 32..63 (high): one group, or two when G == 32 */
                for (int half = 0; half < 2; half++) {
                    const int g = (c * 64 + half * 32) / G;
                    const float s = bf16_to_f32(tsz[(g * ROWS + r) * 2]);
                    const float zt = bf16_to_f32(tsz[(g * ROWS + r) * 2 + 1]) - 8.f * s;
                    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(zt);
                    for (int q = 0; q < 2; q++) { /* bytes 16q..16q+15 -> codes 32 half + 16q .. */
                        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(chunk + r * 32 + 16 * q)));
                        __m512i code = half ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(15));
                        __m512 v = _mm512_fmadd_ps(_mm512_permutexvar_ps(code, values), vs, vz);
                        _mm256_storeu_si256((__m256i *)(o + half * 32 + 16 * q), (__m256i)_mm512_cvtneps_pbh(v));
                    }
                }
            }
        }
    }
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

void zl_int8_tile(const uint16_t *xm, const int8_t *w, const uint16_t *scales, uint16_t *ym, int t, int K) {
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

/* Returns 0, or ZL_EBADSHAPE for a shape outside zl_int8_shape_ok (nothing is read or written then). */
int zl_int8_mm(const uint16_t *x, const int8_t *w, const uint16_t *scales, uint16_t *y,
               int M, int N, int K, int threads) {
    if (M < 1 || threads < 1 || !zl_int8_shape_ok(N, K) || !x || !w || !scales || !y) return ZL_EBADSHAPE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N / ROWS; t++)
        for (int m = 0; m < M; m++) zl_int8_tile(x + (size_t)m * K, w, scales, y + (size_t)m * N, t, K);
    return 0;
}
