#include "cpu_kernels.h"

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
    const uint16_t *codes;    /* int4: the 16 values of the codes (NULL: 0..15, see zl_code_table) */
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
        for (int t = 0; t < m->N / ROWS; t++) zl_int8_tile(x, (const int8_t *)m->w, m->s, y, t, m->K);
        return;
    }
    float xsum[m->K / m->G]; /* every thread sums x itself: K adds, cheaper than another barrier */
    zl_group_sums(x, m->K, m->G, xsum);
    const int pair = zl_int4_pairing(1, m->N, m->K, m->G);
    const __m512i table = zl_code_table(m->codes);
    #pragma omp for schedule(static)
    for (int t = 0; t < m->N / ROWS; t += pair)
        zl_int4_tile_m1(x, (const uint8_t *)m->w, m->s, y, t, pair, m->K, m->G, xsum, table);
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

static int mat_ok(const ZlMat *m, int N, int K) {
    if (m->w == NULL || m->s == NULL || m->N != N || m->K != K) return 0;
    if (m->bits == 8) return zl_int8_shape_ok(N, K);
    return m->bits == 4 && zl_int4_shape_ok(N, K, m->G);
}

/* Whether the dimensions and every layer's matrices are what the step below assumes: rope copies one
 * head into a 256-entry buffer and the attention reads 16 lanes at a time, the matrices chain
 * hidden -> q/k/v -> hidden -> gate/up -> inter -> hidden, and pos is inside the caches. */
static int dims_ok(const ZlDims *d, const ZlLayer *layers, int pos, int threads) {
    const int H = d->hidden, hd = d->head_dim, nq = d->heads, nkv = d->kv_heads, I = d->inter;
    if (d->layers < 1 || H < 1 || I < 1 || nq < 1 || nkv < 1 || nq % nkv || threads < 1) return 0;
    if (hd < 16 || hd > 256 || hd % 16 || pos < 0 || pos >= d->max_tokens || d->window < 0) return 0;
    for (int l = 0; l < d->layers; l++) {
        const ZlLayer *L = layers + l;
        if (!L->w_in || !L->w_post || !L->k_cache || !L->v_cache) return 0;
        if (!mat_ok(&L->qkv, (nq + 2 * nkv) * hd, H) || !mat_ok(&L->o, H, nq * hd)) return 0;
        if (!mat_ok(&L->gate_up, 2 * I, H) || !mat_ok(&L->down, H, I)) return 0;
    }
    return 1;
}

/* h [hidden] bf16, the token's embedding, becomes the last layer's output (before the final norm).
 * cos/sin: the rotary rows of position pos. The caches get position pos; attention reads positions
 * max(0, pos + 1 - window)..pos. Returns 0, -1 when out of memory, or ZL_EBADSHAPE when dims_ok
 * rejects the arguments (nothing is written then). */
int zl_decode_layers(const ZlDims *d, const ZlLayer *layers, uint16_t *h, int pos,
                     const uint16_t *cos, const uint16_t *sin, int threads) {
    if (!d || !layers || !h || !cos || !sin || !dims_ok(d, layers, pos, threads)) return ZL_EBADSHAPE;
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
