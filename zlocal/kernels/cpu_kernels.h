/* Shared by cpu_kernels.c (the int4 and int8 matrix products) and decode.c (the one-token decode step
 * built on them); both are compiled into one library by zlocal/cpu_kernels.py. */
#ifndef ZLOCAL_CPU_KERNELS_H
#define ZLOCAL_CPU_KERNELS_H
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

/* Returned by every entry point for arguments outside what it supports; it then touches no memory. */
#define ZL_EBADSHAPE (-2)
/* groups per int4 row: their scales sit in stack arrays (2 * 4 * MAX_GROUPS floats) */
#define MAX_GROUPS 4096

int zl_int4_shape_ok(int N, int K, int G);
int zl_int8_shape_ok(int N, int K);
/* The sums of x over each group of G inputs (G % 16 == 0), for the zero-point offsets. */
void zl_group_sums(const uint16_t *x, int K, int G, float *xsum);
/* The int4 code table in a register: ``codes`` (16 bf16 values) or, when NULL, the integers 0..15. */
__m512i zl_code_table(const uint16_t *codes);
/* One token: rows 4t.. of y (or 4t.. and 4t+4.. with pair == 2) from tile t of the int4 weight. */
void zl_int4_tile_m1(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y,
                     int t, int pair, int K, int G, const float *xsum, __m512i table);
/* 2 where one-token tiles go in pairs that share each load of x, else 1 */
int zl_int4_pairing(int M, int N, int K, int G);
/* Rows 4t..4t+3 of y (one row of x) from tile t of the int8 weight. */
void zl_int8_tile(const uint16_t *xm, const int8_t *w, const uint16_t *scales, uint16_t *ym, int t, int K);

#endif
