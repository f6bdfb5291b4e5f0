/* slmkit native decode step: one token for each of B rows through a Llama-family decoder.
 *
 * Why this exists: at batch 1 a decode step is ~150 matrix-vector products plus ~300 small
 * element-wise ops. Through torch every op costs ~20 us of dispatch and every fp32 GEMV
 * reads weights at ~10 GB/s on our 2-core AMD EPYC (MKL/oneDNN are tuned for GEMM, not
 * M = 1), so the Python loop spends ~75 ms on a SmolLM2-135M-shaped model whose weights
 * take ~25 ms to stream from memory. Here the whole step runs in one OpenMP parallel
 * region: the GEMVs are split by output rows across threads, attention by (row, head),
 * and the small element-wise work (norms, RoPE, SiLU, residuals) by rows or elements,
 * with a barrier between stages.
 *
 * fp32 weights are read in place from the tensors torch holds ([n, k]). Quantized layers
 * (QuantLinear: uint8 codes, w = (q - zero) * scale, fp16 scales per group, uint8 zeros or
 * the symmetric 2^(bits-1)) are read from a copy repacked once in panels of 16 rows
 * (q8_panel, q4_panel below), so one 64-byte vector serves 16 output rows. They multiply in integers
 * the way llama.cpp's Q8_0 path does: the activation row is rounded to int8 with one float
 * scale per block of 32 columns (int4 weights) or per window of 256 columns (int8 weights,
 * whose products then add up in int32 across the window), and AVX-512 VNNI (vpdpbusd:
 * unsigned weight codes x signed activations) forms the dot products; the zero point comes
 * out exactly through the activation sums.
 *
 * The KV cache is fp32, or fp16 (the default for quantized models: half the bytes that
 * attention streams per step), widened to fp32 as attention loads it.
 *
 * Every output element is computed by the same instruction sequence whatever B is and
 * whichever thread runs it, so a row's result never depends on what else is in the batch.
 * Without AVX-512 (or VNNI for the quantized kinds) plain C loops compute the same function.
 */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SLM_AVX512 1
#endif
#if !defined(SLM_AVX512) && defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(SLM_AVX512) && defined(__AVX512VNNI__)
#define SLM_VNNI 1
#endif

enum { LIN_F32 = 0, LIN_Q8 = 1, LIN_Q4 = 2 };
enum { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };
static const int KV_ESZ[3] = {4, 2, 1};   /* bytes per cached value */

/* The barrier between the stages of a step (about nine per layer), instead of the implicit
 * one of each OpenMP worksharing loop. libgomp's spins only ~100 times before it sleeps in
 * the kernel whenever it manages more threads than there are CPUs, which is the case as
 * soon as a second thread runs parallel regions: a server's engine thread next to the main
 * thread's pool (torch used it while loading). Each of the ~270 barriers of a step then
 * paid a futex wake-up, and the step ran 1.8x slower on a background thread than on the
 * main one (12.6 vs 7.1 ms, int8 135M shape, 1 row; now 6.3-7.9 ms on either). This one
 * spins 256 pauses (~6 us here) and then yields the CPU in a loop, but never sleeps, so the
 * stage after it starts at once, while a server's event loop or clients still get the CPU
 * (bench/serve_load.py, 1 / 8 / 32 clients: 52-79 / 273-336 / 378-452 tok/s before;
 * 113-114 / 461-493 / 503-555 after, against 102-108 / 429-437 / 470-500 spinning 4096
 * pauses). Between steps the threads still sleep in libgomp. The last thread to arrive
 * resets the count and bumps the generation that the others wait on. */
typedef struct {
    atomic_int count, gen, n;
} spin_bar_t;

static inline void cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void bar_wait(spin_bar_t *b) {
    const int gen = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel)
            == atomic_load_explicit(&b->n, memory_order_relaxed) - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->gen, gen + 1, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&b->gen, memory_order_acquire) == gen; spins++) {
        if (spins < 256) cpu_pause();
        else sched_yield();
    }
}

/* Each thread of a new team: the barrier counts the team's actual size. */
static inline void bar_join(spin_bar_t *b) {
    atomic_store_explicit(&b->n, omp_get_num_threads(), memory_order_relaxed);
}
#define QBLOCK 32

typedef struct {
    int32_t kind, n, k, group;
    const void *w;
    const uint16_t *scales;
    const uint8_t *zeros;
    const float *bias;
    /* quantized kinds, VNNI kernels: the same codes repacked in panels of 16 rows (see
     * q8_panel, q4_panel), and per panel, per group, 16 float scales and 16 float zero points */
    const uint8_t *pw;
    const float *psc, *pzf;
    /* quantized kinds: 1 / AWQ input scale per input column (the layer reads x / s), or NULL */
    const float *inv_in;
} lin_t;

typedef struct {
    const float *norm1, *norm2;
    lin_t qkv[3];
    int32_t n_qkv;
    lin_t o;
    lin_t gu[2];
    int32_t n_gu;
    lin_t down;
    void *kc, *vc;      /* [slots, n_kv, max_seq, head_dim], fp32, fp16 or int8 (model_t.kv_kind) */
    int32_t window;     /* sliding window, 0 = full attention */
    float *ks, *vs;     /* int8 cache: each cached row's scale [slots, n_kv, max_seq]; else NULL */
    const float *qn, *kn;   /* RMSNorm weights [head_dim] over each query / key head before
                             * RoPE (Qwen3, Gemma 3), or NULL */
    const float *cos, *sin_signed;  /* this layer's RoPE tables (Gemma 3's local and global
                                     * layers differ), or NULL: the model's */
    const float *norm_ao, *norm_mo; /* RMSNorms on the attention and MLP outputs before the
                                     * residual add (Gemma's sandwich), or NULL */
    int32_t rows;       /* a sliding layer's ring: position p at row p % rows of its KV head
                         * (rows > window, see kv_span); 0: a row per position (max_seq) */
    /* A mixture of experts in place of the MLP (Mixtral, Qwen2-MoE) when n_exp > 0: router
     * [n_exp, hidden] fp32; exp_lin [2 n_exp]: each expert's gate | up linear (2 moe_inter
     * x hidden), then each one's down (hidden x moe_inter), of any kind (fp32, int8, int4,
     * each on its own grid). A row goes to its top_k experts by softmax probability,
     * weighted by that probability (renormalised over the top k when norm_topk); only
     * those experts' weights are read. gu / down then hold the shared expert (Qwen2-MoE;
     * n_gu = 0: none), scaled by sigmoid(shared_gate . x) when shared_gate is set. */
    int32_t n_exp, top_k, norm_topk, moe_inter;
    const float *router;
    const lin_t *exp_lin;
    const float *shared_gate;
} layer_t;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab, max_seq, n_threads;
    float eps, attn_scale;
    const float *cos, *sin_signed;  /* [max_seq, head_dim] */
    const float *final_norm;
    layer_t *layers;
    lin_t lm_head;
    int32_t kv_kind;    /* the KV cache holds fp32 (KV_F32), IEEE fp16 (KV_F16) or int8 codes
                         * with one scale per cached row of head_dim values (KV_I8) */
    float resid_mult;   /* each block's output is added to the residual times this (Granite) */
    int32_t act;        /* gated MLP activation: 0 SiLU, 1 GELU with the tanh approximation */
    float attn_softcap; /* scores become cap * tanh(scores / cap) before softmax (Gemma 2);
                         * 0: off */
    int32_t rot;        /* RoPE on the first rot dims of each head (partial rotary: Phi-3 /
                         * Phi-4-mini's partial_rotary_factor); the RoPE tables are [max_seq, rot] */
    int32_t tap_after;  /* with tap set: each row's hidden state after this many blocks
                         * (transformers' hidden_states[tap_after]) is copied to tap [B, hidden]
                         * (the monitor's hidden-state probe) */
    float *tap;
} model_t;

/* Rows per KV head of layer L's cache (a ring's, or max_seq). */
static inline int kv_rows(const model_t *m, const layer_t *L) { return L->rows ? L->rows : m->max_seq; }

/* The cache rows a query at position p of layer L attends to: positions w0..p (w0 = p -
 * window + 1, or 0), rows lo..hi less g0..g1-1. A ring of R rows holds position q at row
 * q % R; once p >= R the window's rows wrap around when w0 % R > p % R, and the rows between
 * (R - window of them, positions before w0) are the gap. Attention does not depend on the
 * order of its rows, so the wrapped window is the ring less its gap. */
typedef struct { int lo, g0, g1, hi; } span_t;
static inline span_t kv_span(const model_t *m, const layer_t *L, int p) {
    const int w0 = L->window > 0 && p - L->window + 1 > 0 ? p - L->window + 1 : 0;
    const int R = kv_rows(m, L);
    span_t s = {w0 % R, p % R + 1, p % R + 1, p % R};
    if (s.lo > s.hi) { s.g0 = s.hi + 1; s.g1 = s.lo; s.lo = 0; s.hi = R - 1; }
    return s;
}

/* A quantized activation: B rows of k int8 values in blocks of 32. prep writes it row-major
 * (rs = 1): q [B, k], d, c and zs [B, k/32], cg [B, k/group]. The int4 tiles (and int8
 * tiles of 8 rows) read a copy that each thread interleaves for itself (interleave_rows):
 * rs = B, q [k/8, B, 8], d, c and zs [k/32, B] (cg stays row-major), so a tile of 8 rows
 * finds every row's next 8 bytes (and block scale) at one pointer plus a constant offset
 * (with 8 row pointers GCC spilled its accumulators). */
typedef struct {
    int8_t *q;
    float *d;       /* block scales */
    float *c;       /* d * sum(q) of the block (for the zero point) */
    float *cg;      /* c summed over each weight group (int8 layers) */
    int32_t *zs;    /* -8 sum(q) of the block, where an int4 block's int32 sums start (the
                     * symmetric zero point, exactly) */
    int32_t rs;     /* rows interleaved: 1 = row-major */
    int8_t *priv;   /* per-thread scratch for the interleaved copies: thread t's at */
    int64_t priv_bytes;  /* priv + t * priv_bytes */
    spin_bar_t *bar;     /* the team's barrier (the step's worksharing loops end on it) */
} act_t;

/* Bytes of one thread's interleaved copy of B rows of width up to kmax (64-byte aligned). */
static inline int64_t priv_bytes(int B, int kmax) {
    return (((int64_t)B * kmax + 12 * (int64_t)B * (kmax / QBLOCK)) + 63) / 64 * 64;
}

#ifdef SLM_VNNI
/* This thread's interleaved copy of a's B rows of width k (see act_t), in buf. */
static void interleave_rows(const act_t *a, int B, int k, int8_t *buf, act_t *o) {
    const int nb = k / QBLOCK;
    *o = *a;
    o->q = buf;
    o->d = (float *)(buf + (int64_t)B * k);
    o->c = o->d + (int64_t)B * nb;
    o->zs = (int32_t *)(o->c + (int64_t)B * nb);
    o->cg = a->cg;      /* per weight group, left row-major [B, G] */
    o->rs = B;
    for (int u = 0; u < k / 8; u++)
        for (int b = 0; b < B; b++)
            memcpy(o->q + ((int64_t)u * B + b) * 8, a->q + (int64_t)b * k + u * 8, 8);
    for (int j = 0; j < nb; j++)
        for (int b = 0; b < B; b++) {
            o->d[(int64_t)j * B + b] = a->d[(int64_t)b * nb + j];
            o->c[(int64_t)j * B + b] = a->c[(int64_t)b * nb + j];
            o->zs[(int64_t)j * B + b] = a->zs[(int64_t)b * nb + j];
        }
}
#endif

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
    if (exp == 0) {
        if (man == 0) { f = sign; }
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; }
               f = sign | (exp << 23) | ((man & 0x3ff) << 13); }
    } else if (exp == 31) { f = sign | 0x7f800000 | (man << 13); }
    else { f = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float out; memcpy(&out, &f, 4); return out;
#endif
}

/* Round to nearest even, as torch's .half() does (inf/NaN kept, overflow to inf). */
static inline uint16_t float_to_half(float x) {
#if defined(__F16C__)
    return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t f; memcpy(&f, &x, 4);
    uint32_t sign = (f >> 16) & 0x8000, exp = (f >> 23) & 0xff, man = f & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {                                   /* subnormal half (or zero) */
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000;
        int shift = 14 - e;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;   /* may carry into the exponent */
    return (uint16_t)(sign | h);
#endif
}

/* ------------------------------------------------------------------ activation quantization */

/* max |x[i] * inv[i]| (inv NULL: 1) over n values (n a multiple of 16 with AVX-512, which
 * QBLOCK guarantees). */
static inline float abs_max(const float *x, const float *inv, int n) {
    float amax = 0.f;
#ifdef SLM_AVX512
    __m512 m = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (inv) v = _mm512_mul_ps(v, _mm512_loadu_ps(inv + i));
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(m);
#else
    for (int i = 0; i < n; i++) { float v = fabsf(inv ? x[i] * inv[i] : x[i]); amax = v > amax ? v : amax; }
#endif
    return amax;
}

/* Quantize block j of activation row b (32 values) with scale amax / 127: int8 codes,
 * scale, sums, layouts. */
static inline void quantize_block(const float *x, const float *cinv, int b, int j, int k,
                                  float amax, act_t *a) {
    const int nb = k / QBLOCK;
    const float *xr = x + (int64_t)b * k + j * QBLOCK;
    int8_t *dst = a->q + (int64_t)b * k + j * QBLOCK;
    int sum = 0;
#ifdef SLM_AVX512
    __m512 v0 = _mm512_loadu_ps(xr), v1 = _mm512_loadu_ps(xr + 16);
    if (cinv) {   /* the layer's 1 / input scale per column */
        v0 = _mm512_mul_ps(v0, _mm512_loadu_ps(cinv + j * QBLOCK));
        v1 = _mm512_mul_ps(v1, _mm512_loadu_ps(cinv + j * QBLOCK + 16));
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    /* cvtps rounds half to even under the default MXCSR, as lrintf does below */
    __m512i i0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)))));
    __m512i i1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)))));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    /* straight to the row: through a 32-byte buffer written as two 16-byte halves, the
     * reload could not be store-forwarded and stalled (90% of prep_row's time) */
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(i1));
#else
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < QBLOCK; i++) {
        int v = (int)lrintf((cinv ? xr[i] * cinv[j * QBLOCK + i] : xr[i]) * inv);
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        dst[i] = (int8_t)v; sum += v;
    }
#endif
    float d = amax / 127.f;
    a->d[(int64_t)b * nb + j] = d;
    a->c[(int64_t)b * nb + j] = d * (float)sum;
    a->zs[(int64_t)b * nb + j] = -8 * sum;
}

/* Quantize activation row b for layer L's kernel: int8 codes, block scales and sums, and
 * the per-group sums cg of the zero point. int8 layers: one scale per window of 8 blocks
 * (the kernel sums a window in int32); int4 layers: one per block. Called per row from the
 * step's row loops, so it needs no barrier of its own. */
static void prep_row(const lin_t *L, const float *x, int b, act_t *a) {
    if (L->kind == LIN_F32) return;
    const int k = L->k, nb = k / QBLOCK, q8 = L->kind == LIN_Q8, span = q8 ? 8 : 1;
    for (int j0 = 0; j0 < nb; j0 += span) {
        const int j1 = j0 + span < nb ? j0 + span : nb;
        const float amax = abs_max(x + (int64_t)b * k + j0 * QBLOCK,
                                   L->inv_in ? L->inv_in + j0 * QBLOCK : NULL, (j1 - j0) * QBLOCK);
        for (int j = j0; j < j1; j++) quantize_block(x, L->inv_in, b, j, k, amax, a);
    }
    if (!q8) return;
    const int G = k / L->group, bpg = L->group / QBLOCK;
    for (int g = 0; g < G; g++) {
        float s = 0.f;
        for (int j = g * bpg; j < (g + 1) * bpg; j++) s += a->c[(int64_t)b * nb + j];
        a->cg[(int64_t)b * G + g] = s;
    }
}

/* All B rows; an OpenMP worksharing loop (every thread of the team calls it). */
static void prep(const lin_t *L, const float *x, int B, act_t *a) {
    #pragma omp for schedule(static) nowait
    for (int b = 0; b < B; b++) prep_row(L, x, b, a);
    bar_wait(a->bar);
}

/* ------------------------------------------------------------------ dot products, one row
 * Plain C, one (row, activation) pair at a time: the portable path of run_row (attention
 * uses dot_f32 too). With AVX-512 VNNI the tile kernels below compute the same sums. */

static inline float dot_f32(const float *w, const float *x, int k) {
#ifdef SLM_AVX512
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
    }
    for (; i < k; i += 16) {
        __mmask16 m = (k - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, x + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
    float acc[16] = {0};
    for (int i = 0; i < k; i++) acc[i & 15] += w[i] * x[i];
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += acc[i];
    return s;
#endif
}

/* Sum over blocks of d_b * sum_{i in b} q_i * x_i, grouped by the weight's scale groups. */
static float dot_q8(const lin_t *L, int row, const act_t *a, int b) {
    const int k = L->k, nb = k / QBLOCK, bpg = L->group / QBLOCK, G = k / L->group;
    const uint8_t *w = (const uint8_t *)L->w + (int64_t)row * k;
    const int8_t *q = a->q + (int64_t)b * k;
    const float *d = a->d + (int64_t)b * nb, *c = a->c + (int64_t)b * nb;
    const uint16_t *sc = L->scales + (int64_t)row * G;
    const uint8_t *zp = L->zeros ? L->zeros + (int64_t)row * G : NULL;
    float total = 0.f;
    for (int g = 0; g < G; g++) {
        float z = zp ? (float)zp[g] : 128.f, corr = 0.f, part;
        part = 0.f;
        for (int j = g * bpg; j < (g + 1) * bpg; j++) {
            int s = 0;
            for (int i = 0; i < QBLOCK; i++) s += (int)w[j * QBLOCK + i] * (int)q[j * QBLOCK + i];
            part += (float)s * d[j];
            corr += c[j];
        }
        total += half_to_float(sc[g]) * (part - z * corr);
    }
    return total;
}

static float dot_q4(const lin_t *L, int row, const act_t *a, int b) {
    const int k = L->k, nb = k / QBLOCK, G = k / L->group, gsz = L->group;
    const uint8_t *w = (const uint8_t *)L->w + (int64_t)row * (k / 2);
    const uint16_t *sc = L->scales + (int64_t)row * G;
    const uint8_t *zp = L->zeros ? L->zeros + (int64_t)row * G : NULL;
    float total = 0.f;
    for (int j = 0; j < nb; j++) {
        int sacc = 0;
        for (int i = 0; i < QBLOCK; i++) {
            int col = j * QBLOCK + i;
            sacc += ((w[col / 2] >> ((col & 1) * 4)) & 0x0f) * (int)a->q[(int64_t)b * k + col];
        }
        int g = j * QBLOCK / gsz;
        float z = zp ? (float)zp[g] : 8.f;
        total += half_to_float(sc[g]) * (a->d[(int64_t)b * nb + j] * (float)sacc
                                         - z * a->c[(int64_t)b * nb + j]);
    }
    return total;
}

/* ------------------------------------------------------------------ register tiles
 *
 * fp32: a tile computes one weight row against C activation rows with one accumulator per
 * activation: each weight vector is loaded once for C activations, and the C accumulation
 * chains run side by side. Every accumulator sums its chunks in the same order whatever C
 * is, so a row's result does not depend on the tile it lands in, hence not on the batch.
 * Quantized layers use 16-row panels instead (q8_panel, q4_panel). */
#ifdef SLM_AVX512
#define TILE_FN static inline __attribute__((always_inline))
/* With several activation rows a tile spends long enough on each weight line that the
 * hardware prefetcher falls behind (fp32, 8 rows: 11.5 GB/s from DRAM where one row reads
 * 30), so tiles of 2+ rows ask for weights ahead. fp32: 8192 bytes ahead into L2
 * (prefetcht1); same-process A/B on the 8-row step: 28.7-29.2 -> 22.8 ms against 4096
 * bytes into L1, which had taken it from ~52 to ~38 ms. int4: 2048 bytes into L1 (L2 hint
 * measured 8-10% slower; 1024 bytes 0-4% slower at 2-8 rows). int8 tiles prefetch the next
 * panel instead (lin_rows). One row streams fastest without any. */
#define PF_F32 8192
#define PF_Q 2048

TILE_FN void f32_tile(const lin_t *L, int r, const float *x, int b0, float *out, const int C) {
    /* one weight row (one row per tile streamed fastest, measured on 1 and 8 activation
     * rows) against C activation rows: one accumulator per activation over 16-float chunks
     * in order; the C activation vectors stay in registers and each loaded weight vector
     * feeds C FMAs */
    const int k = L->k;
    const float *W = (const float *)L->w + (int64_t)r * k;
    const float *X[8];
    for (int j = 0; j < C; j++) X[j] = x + (int64_t)(b0 + j) * k;
    __m512 acc[8];
    for (int j = 0; j < C; j++) acc[j] = _mm512_setzero_ps();
    int kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 xv[8];
        for (int j = 0; j < C; j++) {
            xv[j] = _mm512_loadu_ps(X[j] + kk);
            __asm__("" : "+v"(xv[j]));   /* keep it in a register: GCC otherwise reloads it
                                          * as a memory operand of every FMA */
        }
        if (C >= 2) _mm_prefetch((const char *)(W + kk) + PF_F32, _MM_HINT_T1);
        __m512 wv = _mm512_loadu_ps(W + kk);
        for (int j = 0; j < C; j++) acc[j] = _mm512_fmadd_ps(wv, xv[j], acc[j]);
    }
    if (kk < k) {
        const __mmask16 m = (__mmask16)((1u << (k - kk)) - 1);
        __m512 wv = _mm512_maskz_loadu_ps(m, W + kk);
        for (int j = 0; j < C; j++)
            acc[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, X[j] + kk), acc[j]);
    }
    for (int j = 0; j < C; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
}
#endif

#ifdef SLM_VNNI
/* acc + (u8 x s8 dot products of u's lanes with the 4 bytes at p, broadcast to every lane).
 * GCC 12 copies accumulators around the intrinsic in unrolled tiles (up to 14 register
 * moves per 8 products, seen in the generated code); the asm form updates them in place. */
static inline __m512i dpb(__m512i acc, __m512i u, const int8_t *p) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t *)p));
    return acc;
#else
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(v));
#endif
}

/* Quantized layers, 16 weight rows (a panel) against C activation rows:
 * out[j * 16 + i] = row 16p + i of L times activation row b0 + j.
 *
 * Panel layout (repacked once from the row-major codes, see native/__init__.py): one
 * 64-byte vector holds the same 4 (int8) or 8 (int4) columns of the panel's 16 rows, so a
 * VNNI instruction multiplies 16 rows by 4 activation bytes broadcast to every lane and each
 * lane accumulates its own row: no horizontal sums, and a loaded weight vector serves all C
 * activation rows.
 *   int8: vector v = columns 4v..4v+3, row i in bytes 4i..4i+3;
 *   int4: vector v = columns 8v..8v+7, row i in bytes 4i..4i+3, byte b holding column
 *         8v+b in its low nibble and 8v+4+b in its high nibble.
 * int8 (this function): each lane sums in int32 over a 256-column window that shares one
 * activation scale (at most 64 * 255 * 127 per lane) in two chains (even and odd 4-column
 * steps) to hide the instruction latency; then, per window, one float multiply-add by the
 * activation scale; per weight group, the zero point (through the activation sums cg) and
 * the 16 row scales. int4: q4_panel. Every (row, activation) pair takes the same sequence
 * whatever C is, so a row's result does not depend on the batch. */
TILE_FN void q8_panel(const lin_t *L, int p, const act_t *a, int b0, float *out, const int C,
                      const int64_t pfo) {
    const int k = L->k, nb = k / QBLOCK, gsz = L->group, G = k / gsz;
    const int span = 256;                        /* activation-scale window, a power of two */
    const uint8_t *wp = L->pw + (int64_t)p * (k / 4) * 64;
    const float *sw = L->psc + (int64_t)p * G * 16, *zw = L->pzf + (int64_t)p * G * 16;
    const int8_t *xq[4];
    const float *dj[4], *cgj[4];
    for (int j = 0; j < C; j++) {
        xq[j] = a->q + (int64_t)(b0 + j) * k;
        dj[j] = a->d + (int64_t)(b0 + j) * nb;
        cgj[j] = a->cg + (int64_t)(b0 + j) * G;
    }
    __m512 facc[4];
    for (int j = 0; j < C; j++) facc[j] = _mm512_setzero_ps();
    int col = 0;
    for (int g = 0; g < G; g++) {
        __m512 gacc[4];
        for (int j = 0; j < C; j++) gacc[j] = _mm512_setzero_ps();
        const int gend = col + gsz;
        while (col < gend) {
            const int e = ((col | (span - 1)) + 1) < gend ? ((col | (span - 1)) + 1) : gend;
            const int steps = (e - col) >> 3;
            __m512i z0[4], z1[4];
            for (int j = 0; j < C; j++) z0[j] = z1[j] = _mm512_setzero_si512();
            #pragma GCC unroll 4
            for (int t = 0; t < steps; t++) {
                __m512i u0, u1;
                if (pfo) _mm_prefetch((const char *)wp + pfo, _MM_HINT_T1);
                u0 = _mm512_loadu_si512((const void *)wp);
                u1 = _mm512_loadu_si512((const void *)(wp + 64));
                wp += 128;
                for (int j = 0; j < C; j++) {
                    z0[j] = dpb(z0[j], u0, xq[j] + col + 8 * t);
                    z1[j] = dpb(z1[j], u1, xq[j] + col + 8 * t + 4);
                }
            }
            for (int j = 0; j < C; j++)
                gacc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(z0[j], z1[j])),
                                          _mm512_set1_ps(dj[j][col >> 5]), gacc[j]);
            col = e;
        }
        const __m512 swv = _mm512_loadu_ps(sw + g * 16), zv = _mm512_loadu_ps(zw + g * 16);
        for (int j = 0; j < C; j++)
            facc[j] = _mm512_fmadd_ps(swv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(cgj[j][g]), gacc[j]),
                                      facc[j]);
    }
    for (int j = 0; j < C; j++) _mm512_storeu_ps(out + j * 16, facc[j]);
}
/* int8, 8 activation rows, from the interleaved copy (a, rs = B; rm: the row-major one for
 * the group sums cg): one accumulation chain per row, as eight side by side hide the
 * latency without q8_panel's even/odd pair (which would need 16 accumulators here), and one
 * pass over the panel where two 4-row passes ran before. The same int32 sums and float
 * steps as q8_panel, so a row's result is bit for bit the same. Same-process A/B of the
 * int8 step (15 interleaved reps, context 48): 8 rows 7.20 -> 6.08 ms, 16 rows 11.83 ->
 * 9.09; prefill of 32 tokens 14.2 -> 12.7 ms. */
static __attribute__((noinline)) void q8_panel_8(const lin_t *L, int p, const act_t *a,
                                                  const act_t *rm, int b0, float *out,
                                                  const int64_t pfo) {
    const int k = L->k, gsz = L->group, G = k / gsz, span = 256;
    const int64_t R = a->rs;
    const uint8_t *wp = L->pw + (int64_t)p * (k / 4) * 64;
    const float *sw = L->psc + (int64_t)p * G * 16, *zw = L->pzf + (int64_t)p * G * 16;
    const int8_t *xp = a->q + 8 * (int64_t)b0;
    const float *cg = rm->cg + (int64_t)b0 * G;
    __m512 facc[8];
    for (int j = 0; j < 8; j++) facc[j] = _mm512_setzero_ps();
    int col = 0;
    for (int g = 0; g < G; g++) {
        __m512 gacc[8];
        for (int j = 0; j < 8; j++) gacc[j] = _mm512_setzero_ps();
        const int gend = col + gsz;
        while (col < gend) {
            const int e = ((col | (span - 1)) + 1) < gend ? ((col | (span - 1)) + 1) : gend;
            const int steps = (e - col) >> 3;
            __m512i z[8];
            for (int j = 0; j < 8; j++) z[j] = _mm512_setzero_si512();
            #pragma GCC unroll 4
            for (int t = 0; t < steps; t++) {
                if (pfo) {   /* both lines of the 128 bytes (one: 7.20 -> 6.53 ms for 8 rows) */
                    _mm_prefetch((const char *)wp + pfo, _MM_HINT_T1);
                    _mm_prefetch((const char *)wp + pfo + 64, _MM_HINT_T1);
                }
                const __m512i u0 = _mm512_loadu_si512((const void *)wp);
                const __m512i u1 = _mm512_loadu_si512((const void *)(wp + 64));
                wp += 128;
                for (int j = 0; j < 8; j++) {
                    z[j] = dpb(z[j], u0, xp + 8 * j);
                    z[j] = dpb(z[j], u1, xp + 8 * j + 4);
                }
                xp += 8 * R;
            }
            const float *d = a->d + (int64_t)(col >> 5) * R + b0;
            for (int j = 0; j < 8; j++)
                gacc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(z[j]), _mm512_set1_ps(d[j]), gacc[j]);
            col = e;
        }
        const __m512 swv = _mm512_loadu_ps(sw + g * 16), zv = _mm512_loadu_ps(zw + g * 16);
        for (int j = 0; j < 8; j++)
            facc[j] = _mm512_fmadd_ps(swv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(cg[(int64_t)j * G + g]), gacc[j]),
                                      facc[j]);
    }
    for (int j = 0; j < 8; j++) _mm512_storeu_ps(out + j * 16, facc[j]);
}
/* int4 panels: blocks of 32 columns are both the activation-scale span and the smallest
 * weight group, so each block's int32 dot products take one multiply-add by weight scale x
 * activation scale. The zero point: symmetric codes (zero 8) start the int32 sums at
 * -8 sum(q) (exact); asymmetric ones come off in float through the block's activation sum
 * c, one more multiply-add with the group's scale x zero. The activations are interleaved
 * (act_t): row b0 + j of 8-column unit u is at xp + u * 8 rs + 8 j, so the VNNI instructions
 * of all C rows address through one pointer. One accumulation chain per activation row (up
 * to 8 side by side). */
TILE_FN void q4_panel(const lin_t *L, int p, const act_t *a, int b0, float *out, const int C,
                      const int ASYM, const int64_t pfo) {
    const int k = L->k, bpg = L->group / QBLOCK, G = k / L->group;
    const int64_t R = a->rs;
    const uint8_t *wp = L->pw + (int64_t)p * (k / 8) * 64;
    const float *sw = L->psc + (int64_t)p * G * 16, *zw = L->pzf + (int64_t)p * G * 16;
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int8_t *xp = a->q + 8 * (int64_t)b0;
    const float *dp = a->d + b0, *cp = a->c + b0;
    const int32_t *zp = a->zs + b0;
    __m512 facc[8];
    for (int j = 0; j < C; j++) facc[j] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const __m512 swv = _mm512_loadu_ps(sw + g * 16);
        const __m512 szv = ASYM ? _mm512_mul_ps(swv, _mm512_loadu_ps(zw + g * 16)) : swv;
        for (int blk = 0; blk < bpg; blk++) {
            __m512i z[8];
            for (int j = 0; j < C; j++) z[j] = ASYM ? _mm512_setzero_si512() : _mm512_set1_epi32(zp[j]);
            #pragma GCC unroll 4
            for (int t = 0; t < 4; t++) {
                if (pfo) _mm_prefetch((const char *)wp + pfo, _MM_HINT_T0);
                __m512i wv = _mm512_loadu_si512((const void *)wp);
                __m512i lo = _mm512_and_si512(wv, low), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
                wp += 64;
                for (int j = 0; j < C; j++) {
                    z[j] = dpb(z[j], lo, xp + 8 * j);
                    z[j] = dpb(z[j], hi, xp + 8 * j + 4);
                }
                xp += 8 * R;
            }
            for (int j = 0; j < C; j++) {
                facc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(z[j]),
                                          _mm512_mul_ps(swv, _mm512_set1_ps(dp[j])), facc[j]);
                if (ASYM) facc[j] = _mm512_fnmadd_ps(szv, _mm512_set1_ps(cp[j]), facc[j]);
            }
            dp += R;
            cp += R;
            zp += R;
        }
    }
    for (int j = 0; j < C; j++) _mm512_storeu_ps(out + j * 16, facc[j]);
}
#define Q8P(C) static __attribute__((noinline)) void q8_panel_##C( \
    const lin_t *L, int p, const act_t *a, int b0, float *out, int64_t pfo) { q8_panel(L, p, a, b0, out, C, pfo); }
#define Q4P(C, A) static __attribute__((noinline)) void q4_panel_##C##_##A( \
    const lin_t *L, int p, const act_t *a, int b0, float *out, int64_t pfo) { q4_panel(L, p, a, b0, out, C, A, pfo); }
Q8P(1) Q8P(2) Q8P(4)
Q4P(1, 0) Q4P(2, 0) Q4P(4, 0) Q4P(8, 0) Q4P(1, 1) Q4P(2, 1) Q4P(4, 1) Q4P(8, 1)
#endif

/* Each C is its own function, compiled with constant bounds, so the compiler unrolls the
 * loops over activations and keeps the accumulators in registers. */
#ifdef SLM_AVX512
#define F32T(C) static __attribute__((noinline)) void f32_tile_##C( \
    const lin_t *L, int r, const float *x, int b0, float *out) { f32_tile(L, r, x, b0, out, C); }
F32T(1) F32T(2) F32T(4) F32T(8)
#endif

/* Weight row r against activation rows b0 .. b0 + C - 1: out[j]. */
static void run_row(const lin_t *L, int r, const float *x, const act_t *a, int b0, int C,
                    float *out) {
#ifdef SLM_AVX512
    if (L->kind == LIN_F32) {
        if (C == 8) f32_tile_8(L, r, x, b0, out);
        else if (C == 4) f32_tile_4(L, r, x, b0, out);
        else if (C == 2) f32_tile_2(L, r, x, b0, out);
        else f32_tile_1(L, r, x, b0, out);
        return;
    }
#endif
    for (int j = 0; j < C; j++)     /* portable path: one dot product at a time */
        out[j] = L->kind == LIN_F32
            ? dot_f32((const float *)L->w + (int64_t)r * L->k, x + (int64_t)(b0 + j) * L->k, L->k)
            : L->kind == LIN_Q8 ? dot_q8(L, r, a, b0 + j) : dot_q4(L, r, a, b0 + j);
}

/* y[b, off + r] = L(x_b)[r] for rows r in [r0, r1). */
static void lin_rows(const lin_t *L, const float *x, const act_t *a, const act_t *ai, int B,
                     float *y, int ystride, int off, int r0, int r1) {
    float out[128];
#ifdef SLM_VNNI
    if (L->pw) {   /* quantized, repacked: r0 is a multiple of 16, one panel */
        const int p = r0 / 16, rows = r1 - r0;
        for (int b0 = 0; b0 < B;) {
            const int q4 = L->kind == LIN_Q4, asym = L->zeros != NULL;
            int C = B - b0 >= 4 ? 4 : (B - b0 >= 2 ? 2 : 1);
            if (B - b0 >= 8 && (q4 || ai->rs == B)) C = 8;
            /* int8 tiles ask for the next panel (same offset, into L2) in the last pass over
             * this one, so memory keeps streaming while the passes run from cache (same-process
             * A/B, int8 step: 2 rows 6.1 -> 4.5 ms, 4 rows 6.6 -> 5.6, 8 rows 8.1 -> 7.5; the
             * 4-row tiles ask for one line in two, as asking for both measured no better) */
            const int64_t pfo = q4 ? (C >= 2 ? PF_Q : 0)
                                   : (B >= 2 && b0 + C >= B ? 16 * (int64_t)L->k : 0);
            if (!q4) {
                if (C == 8) q8_panel_8(L, p, ai, a, b0, out, pfo);
                else if (C == 4) q8_panel_4(L, p, a, b0, out, pfo);
                else if (C == 2) q8_panel_2(L, p, a, b0, out, pfo);
                else q8_panel_1(L, p, a, b0, out, pfo);
            } else if (asym) {
                if (C == 8) q4_panel_8_1(L, p, a, b0, out, pfo);
                else if (C == 4) q4_panel_4_1(L, p, a, b0, out, pfo);
                else if (C == 2) q4_panel_2_1(L, p, a, b0, out, pfo);
                else q4_panel_1_1(L, p, a, b0, out, pfo);
            } else {
                if (C == 8) q4_panel_8_0(L, p, a, b0, out, pfo);
                else if (C == 4) q4_panel_4_0(L, p, a, b0, out, pfo);
                else if (C == 2) q4_panel_2_0(L, p, a, b0, out, pfo);
                else q4_panel_1_0(L, p, a, b0, out, pfo);
            }
            const __mmask16 m = rows >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
            const __m512 bias = L->bias ? _mm512_maskz_loadu_ps(m, L->bias + r0) : _mm512_setzero_ps();
            for (int j = 0; j < C; j++)
                _mm512_mask_storeu_ps(y + (int64_t)(b0 + j) * ystride + off + r0, m,
                                      _mm512_add_ps(_mm512_loadu_ps(out + j * 16), bias));
            b0 += C;
        }
        return;
    }
#endif
    for (int b0 = 0; b0 < B;) {
        int C = B - b0 >= 8 ? 8 : B - b0 >= 4 ? 4 : (B - b0 >= 2 ? 2 : 1);
        for (int r = r0; r < r1; r++) {
            run_row(L, r, x, a, b0, C, out);
            for (int j = 0; j < C; j++) {
                float v = out[j];
                if (L->bias) v += L->bias[r];
                y[(int64_t)(b0 + j) * ystride + off + r] = v;
            }
        }
        b0 += C;
    }
}

/* The start of the K and V rows that this thread's attention items of the layer will read,
 * asked for (into L2) a few lines per weight tile while the q/k/v linear runs (compute-bound
 * at 4+ rows): attention's short streams then start from cache instead of waiting on memory,
 * and the hardware prefetcher takes over from there. Same-process A/B, int4, 8 rows,
 * context 48: 5.55 -> 5.17 ms a step; at context 200 (where prefetching whole rows ran out
 * of L2 and cost 4-15%) 6.83 -> 6.72 ms; fp32 unchanged. Only a hint: results are
 * bit-identical, and a different runtime's loop split would only waste the prefetches. */
#define KVPF_BYTES 4096     /* of each K and V range */
#define KVPF_MAX 64
typedef struct {
    const char *p[KVPF_MAX];
    int64_t n[KVPF_MAX];
    int nr, cur, per_tile;
    int64_t off;
} kvpf_t;
static inline void kvpf_add(kvpf_t *f, const char *p, int64_t n) {
    if (n > KVPF_BYTES) n = KVPF_BYTES;
    if (f->nr < KVPF_MAX && n > 0) { f->p[f->nr] = p; f->n[f->nr] = n; f->nr++; }
}
static inline void kvpf_step(kvpf_t *f) {
    for (int i = 0; i < f->per_tile && f->cur < f->nr; i++) {
        __builtin_prefetch(f->p[f->cur] + f->off, 0, 2);   /* prefetcht1 on x86 */
        f->off += 64;
        if (f->off >= f->n[f->cur]) { f->cur++; f->off = 0; }
    }
}
/* Iterations [lo, hi) of an n-long schedule(static) loop that thread t of nt runs (libgomp's
 * split; the step's loops are all of that kind). */
static inline void static_share(int n, int t, int nt, int *lo, int *hi) {
    const int q = n / nt, r = n % nt;
    *lo = t < r ? t * (q + 1) : t * q + r;
    *hi = *lo + (t < r ? q + 1 : q);
}

/* Several linears sharing one input (q/k/v, gate/up): outputs side by side in y [B, sum n].
 * Work items are 8 rows (fp32, portable) or one 16-row panel (repacked quantized layers).
 * Must be called by every thread of the team (it is an OpenMP worksharing loop). */
static inline int tile_rows(const lin_t *L) { return L->pw ? 16 : 8; }
static void lin_multi_pf(const lin_t *Ls, int nl, const float *x, const act_t *a, int B, float *y,
                         kvpf_t *pf) {
    int ystride = 0, tiles = 0;
    const act_t *ai = a;     /* interleaved copy: int4 tiles from 2 rows, int8 ones of 8 */
#ifdef SLM_VNNI
    act_t own;
    int q4 = 0, q8 = 0;
    for (int j = 0; j < nl; j++) {
        q4 |= Ls[j].pw != NULL && Ls[j].kind == LIN_Q4;
        q8 |= Ls[j].pw != NULL && Ls[j].kind == LIN_Q8;
    }
    if ((q4 && B >= 2) || (q8 && B >= 8)) {
        interleave_rows(a, B, Ls[0].k, a->priv + omp_get_thread_num() * a->priv_bytes, &own);
        ai = &own;
    }
#endif
    for (int j = 0; j < nl; j++) { ystride += Ls[j].n; tiles += (Ls[j].n + tile_rows(&Ls[j]) - 1) / tile_rows(&Ls[j]); }
    #pragma omp for schedule(static) nowait
    for (int t = 0; t < tiles; t++) {
        int j = 0, tt = t, off = 0;
        while (tt >= (Ls[j].n + tile_rows(&Ls[j]) - 1) / tile_rows(&Ls[j])) {
            tt -= (Ls[j].n + tile_rows(&Ls[j]) - 1) / tile_rows(&Ls[j]); off += Ls[j].n; j++;
        }
        int T = tile_rows(&Ls[j]), r0 = tt * T, r1 = r0 + T < Ls[j].n ? r0 + T : Ls[j].n;
        lin_rows(&Ls[j], x, Ls[j].kind == LIN_Q4 ? ai : a, ai, B, y, ystride, off, r0, r1);
        if (pf) kvpf_step(pf);
    }
    bar_wait(a->bar);
}
static inline void lin_multi(const lin_t *Ls, int nl, const float *x, const act_t *a, int B, float *y) {
    lin_multi_pf(Ls, nl, x, a, B, y, NULL);
}

/* This thread's share of the (row, KV head) attention items of layer L, spread over its
 * share of the q/k/v tiles. */
static void kvpf_plan(const model_t *m, const layer_t *L, int B, const int64_t *slots,
                      const int64_t *pos, kvpf_t *pf) {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num(), esz = KV_ESZ[m->kv_kind];
    const int D = m->head_dim, R = kv_rows(m, L);
    int lo, hi, tiles = 0, tlo, thi;
    static_share(B * m->n_kv, t, nt, &lo, &hi);
    pf->nr = pf->cur = 0;
    pf->off = 0;
    for (int it = lo; it < hi; it++) {   /* the rows cached before this step (up to p - 1) */
        const int b = it / m->n_kv, kh = it % m->n_kv;
        const span_t r = kv_span(m, L, (int)pos[b]);
        const int64_t row0 = ((int64_t)slots[b] * m->n_kv + kh) * R;
        /* position p's row (g0 - 1) is written in this step; a wrapped window goes on at g1 */
        const int first = r.g0 - 1 - r.lo, second = r.hi - r.g1 + 1;
        kvpf_add(pf, (const char *)L->kc + (row0 + r.lo) * D * esz, (int64_t)first * D * esz);
        kvpf_add(pf, (const char *)L->vc + (row0 + r.lo) * D * esz, (int64_t)first * D * esz);
        if (r.g0 <= r.hi) {
            kvpf_add(pf, (const char *)L->kc + (row0 + r.g1) * D * esz, (int64_t)second * D * esz);
            kvpf_add(pf, (const char *)L->vc + (row0 + r.g1) * D * esz, (int64_t)second * D * esz);
        }
    }
    for (int j = 0; j < L->n_qkv; j++) tiles += (L->qkv[j].n + tile_rows(&L->qkv[j]) - 1) / tile_rows(&L->qkv[j]);
    static_share(tiles, t, nt, &tlo, &thi);
    int64_t lines = 0;
    for (int r = 0; r < pf->nr; r++) lines += (pf->n[r] + 63) / 64;
    pf->per_tile = thi > tlo ? (int)((lines + (thi - tlo) - 1) / (thi - tlo)) : 0;
}

#ifdef SLM_AVX512
/* e^x for 16 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by the degree-6 Cephes polynomial,
 * then scaled by 2^n (vscalefps). About 1 ulp; inputs clamped to the float range. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* out[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u for n <= 16 values. */
static inline void silu_mul(const float *g, const float *u, float *out, int n) {
#ifdef SLM_AVX512
    __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    __m512 gv = _mm512_maskz_loadu_ps(m, g), uv = _mm512_maskz_loadu_ps(m, u);
    __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
    _mm512_mask_storeu_ps(out, m, _mm512_div_ps(_mm512_mul_ps(gv, uv), den));
#else
    for (int i = 0; i < n; i++) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
#endif
}

/* out = GELU(g) * u, GELU's tanh approximation as torch computes it (Gemma). */
static inline void gelu_tanh_mul(const float *g, const float *u, float *out, int n) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;
    for (int i = 0; i < n; i++) {
        const float x = g[i], inner = beta * (x + kappa * x * x * x);
        out[i] = 0.5f * x * (1.f + tanhf(inner)) * u[i];
    }
}

/* s[i] = e^(s[i] - mx) for n values; returns their sum (16 lanes, then the lanes in order). */
static inline float exp_sub_sum(float *s, int n, float mx) {
#ifdef SLM_AVX512
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), mv)));
        _mm512_mask_storeu_ps(s + i, m, e);
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0.f;
    for (int i = 0; i < n; i++) { s[i] = expf(s[i] - mx); sum += s[i]; }
    return sum;
#endif
}

static void rms_norm(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.f;
    int i = 0;
#ifdef SLM_AVX512
    __m512 acc = _mm512_setzero_ps();   /* 16 partial sums: a scalar chain waits 4 cycles per add */
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
    ss = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}


/* The cache rows a query attends to are lo..p less g0..g1-1 (a ring's rows outside the
 * window, see kv_span; g0 = g1 = p + 1 when none): the next row after j. */
#define NEXT_ROW(j, g0, g1) ((j) + 1 == (g0) ? (g1) : (j) + 1)

/* Attention reads the KV cache as fp32, fp16 or int8 codes (KF, a compile-time constant in
 * every caller, so each kind gets its own loop). int8: the code alone; its row's scale is
 * applied once per row, to the key's score and to the value's weight. */
static inline float kv_at(const void *base, int64_t i, const int KF) {
    return KF == KV_F16 ? half_to_float(((const uint16_t *)base)[i])
         : KF == KV_I8 ? (float)((const int8_t *)base)[i] : ((const float *)base)[i];
}
#ifdef SLM_AVX512
static inline __m512 kv16(const void *base, int64_t i, const int KF) {
    if (KF == KV_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    if (KF == KV_I8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)base + i))));
    return _mm512_loadu_ps((const float *)base + i);
}

/* NH query heads (q, D = 16 NC apart) against rows lo..p of one KV head: o_h = softmax(scale *
 * K q_h) V. Each key and value row is loaded (and widened from fp16) once for all NH heads.
 * sc: NH score rows, S apart. Every head takes the same instruction sequence whatever NH is,
 * so a head's result does not depend on how heads are grouped. */
static inline __attribute__((always_inline)) void attend_tile(
        const float *q, const void *K, const void *V, const float *KS, const float *VS, int lo,
        int g0, int g1, int p, float scale, float *sc, int S, float *o, const int NH,
        const int NC, const int KF) {
    const int D = 16 * NC;
    __m512 qv[12], ov[12];
    float mx[12];
    for (int h = 0; h < NH; h++) {
        mx[h] = -INFINITY;
        for (int c = 0; c < NC; c++) qv[h * NC + c] = _mm512_loadu_ps(q + h * D + 16 * c);
    }
    for (int j = lo; j <= p; j = NEXT_ROW(j, g0, g1)) {
        __m512 kr[8];
        for (int c = 0; c < NC; c++) kr[c] = kv16(K, (int64_t)j * D + 16 * c, KF);
        for (int h = 0; h < NH; h++) {
            __m512 acc = _mm512_mul_ps(kr[0], qv[h * NC]);
            for (int c = 1; c < NC; c++) acc = _mm512_fmadd_ps(kr[c], qv[h * NC + c], acc);
            float v = _mm512_reduce_add_ps(acc);
            if (KF == KV_I8) v *= KS[j];            /* the key row's scale */
            v *= scale;
            sc[h * S + j] = v;
            mx[h] = v > mx[h] ? v : mx[h];
        }
    }
    float inv[12];
    for (int h = 0; h < NH; h++) {
        inv[h] = 1.f / (exp_sub_sum(sc + h * S + lo, g0 - lo, mx[h])
                        + exp_sub_sum(sc + h * S + g1, p - g1 + 1, mx[h]));
        for (int c = 0; c < NC; c++) ov[h * NC + c] = _mm512_setzero_ps();
    }
    for (int j = lo; j <= p; j = NEXT_ROW(j, g0, g1)) {   /* o += e_j * v_j, normalized once */
        __m512 vr[8];
        for (int c = 0; c < NC; c++) vr[c] = kv16(V, (int64_t)j * D + 16 * c, KF);
        for (int h = 0; h < NH; h++) {
            const __m512 w = _mm512_set1_ps(KF == KV_I8 ? sc[h * S + j] * VS[j] : sc[h * S + j]);
            for (int c = 0; c < NC; c++) ov[h * NC + c] = _mm512_fmadd_ps(w, vr[c], ov[h * NC + c]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(o + h * D + 16 * c, _mm512_mul_ps(ov[h * NC + c], _mm512_set1_ps(inv[h])));
}
#define ATT(NH, NC, F) static __attribute__((noinline)) void attend_##NH##_##NC##_##F( \
    const float *q, const void *K, const void *V, const float *KS, const float *VS, int lo, \
    int g0, int g1, int p, float scale, float *sc, int S, float *o) { \
    attend_tile(q, K, V, KS, VS, lo, g0, g1, p, scale, sc, S, o, NH, NC, F); }
/* head dim 64 (most small models) in up to 3 heads a pass; other multiples of 16 up to 128
 * one head at a time */
ATT(1, 4, 0) ATT(2, 4, 0) ATT(3, 4, 0) ATT(1, 4, 1) ATT(2, 4, 1) ATT(3, 4, 1)
ATT(1, 4, 2) ATT(2, 4, 2) ATT(3, 4, 2)
ATT(1, 1, 0) ATT(1, 2, 0) ATT(1, 3, 0) ATT(1, 5, 0) ATT(1, 6, 0) ATT(1, 7, 0) ATT(1, 8, 0)
ATT(1, 1, 1) ATT(1, 2, 1) ATT(1, 3, 1) ATT(1, 5, 1) ATT(1, 6, 1) ATT(1, 7, 1) ATT(1, 8, 1)
ATT(1, 1, 2) ATT(1, 2, 2) ATT(1, 3, 2) ATT(1, 5, 2) ATT(1, 6, 2) ATT(1, 7, 2) ATT(1, 8, 2)
typedef void (*attend_fn)(const float *, const void *, const void *, const float *,
                          const float *, int, int, int, int, float, float *, int, float *);
static const attend_fn ATTEND_ONE[3][9] = {
    {NULL, attend_1_1_0, attend_1_2_0, attend_1_3_0, attend_1_4_0, attend_1_5_0, attend_1_6_0,
     attend_1_7_0, attend_1_8_0},
    {NULL, attend_1_1_1, attend_1_2_1, attend_1_3_1, attend_1_4_1, attend_1_5_1, attend_1_6_1,
     attend_1_7_1, attend_1_8_1},
    {NULL, attend_1_1_2, attend_1_2_2, attend_1_3_2, attend_1_4_2, attend_1_5_2, attend_1_6_2,
     attend_1_7_2, attend_1_8_2}};
static const attend_fn ATTEND_64[3][4] = {
    {NULL, attend_1_4_0, attend_2_4_0, attend_3_4_0},
    {NULL, attend_1_4_1, attend_2_4_1, attend_3_4_1},
    {NULL, attend_1_4_2, attend_2_4_2, attend_3_4_2}};
#endif

/* One query head, any head dim: the portable path. */
static void attend_plain(const float *q, const void *K, const void *V, const float *KS,
                         const float *VS, int lo, int g0, int g1, int p, int D, float scale,
                         float cap, float *sc, float *o, const int KF) {
    float mx = -INFINITY;
    for (int j = lo; j <= p; j = NEXT_ROW(j, g0, g1)) {
        float acc[16] = {0}, s = 0.f;
        for (int i = 0; i < D; i++) acc[i & 15] += kv_at(K, (int64_t)j * D + i, KF) * q[i];
        for (int i = 0; i < 16; i++) s += acc[i];
        sc[j] = (KF == KV_I8 ? s * KS[j] : s) * scale;
        if (cap > 0.f) sc[j] = tanhf(sc[j] / cap) * cap;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    const float inv = 1.f / (exp_sub_sum(sc + lo, g0 - lo, mx) + exp_sub_sum(sc + g1, p - g1 + 1, mx));
    for (int i = 0; i < D; i++) o[i] = 0.f;
    for (int j = lo; j <= p; j = NEXT_ROW(j, g0, g1)) {
        const float wgt = KF == KV_I8 ? sc[j] * VS[j] : sc[j];
        for (int i = 0; i < D; i++) o[i] += wgt * kv_at(V, (int64_t)j * D + i, KF);
    }
    for (int i = 0; i < D; i++) o[i] *= inv;
}

/* One row of n values into the cache at element offset at: copied (fp32); rounded to fp16
 * and saturated at +-65504 (as KVCache.write does), so an outlier key stays finite; or
 * rounded to int8 codes with the scale max|x| / 127, written to *scale (KVCache.write's
 * arithmetic: codes rint(x * (127 / max|x|)), half to even). */
#define FP16_MAX 65504.f
static inline void kv_store(void *base, float *scale, int64_t at, const float *x, int n, int kind) {
    if (kind == KV_F32) { memcpy((float *)base + at, x, (size_t)n * sizeof(float)); return; }
    if (kind == KV_I8) {
        float amax = 0.f;
        for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t *d = (int8_t *)base + at;
        for (int i = 0; i < n; i++) {
            const float v = rintf(x[i] * inv);
            d[i] = (int8_t)(v > 127.f ? 127.f : (v < -127.f ? -127.f : v));
        }
        *scale = amax / 127.f;
        return;
    }
    uint16_t *d = (uint16_t *)base + at;
    int i = 0;
#ifdef SLM_AVX512
    const __m512 lo = _mm512_set1_ps(-FP16_MAX), hi = _mm512_set1_ps(FP16_MAX);
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(
            _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_loadu_ps(x + i))), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) d[i] = float_to_half(x[i] > FP16_MAX ? FP16_MAX : (x[i] < -FP16_MAX ? -FP16_MAX : x[i]));
}

/* KV head kh's key and value of one token (its q/k/v row) into the cache at (slot, pos). */
static inline void kv_put(const model_t *m, const layer_t *L, int64_t slot, int kh, int64_t pos,
                          const float *row) {
    const int D = m->head_dim, nq = m->n_heads * D, nk = m->n_kv * D, R = kv_rows(m, L);
    const int64_t r = (slot * m->n_kv + kh) * R + pos % R;   /* the cached row */
    kv_store(L->kc, L->ks ? L->ks + r : NULL, r * D, row + nq + kh * D, D, m->kv_kind);
    kv_store(L->vc, L->vs ? L->vs + r : NULL, r * D, row + nq + nk + kh * D, D, m->kv_kind);
}

/* Query heads h0 .. h0 + nh - 1 (all of one KV head) against rows lo..p of that KV head. */
static void attend(const float *q, const void *K, const void *V, const float *KS,
                   const float *VS, span_t r, int D, float scale, float cap, float *sc,
                   int S, float *o, int nh, int kind) {
    const int lo = r.lo, g0 = r.g0, g1 = r.g1, p = r.hi;
#ifdef SLM_AVX512
    /* soft-capped scores (cap > 0: Gemma 2) take the portable path below */
    if (cap <= 0.f && D == 64) {
        for (int h = 0; h < nh; h += 3) {
            const int n = nh - h < 3 ? nh - h : 3;
            ATTEND_64[kind][n](q + h * D, K, V, KS, VS, lo, g0, g1, p, scale, sc + (int64_t)h * S, S, o + h * D);
        }
        return;
    }
    if (cap <= 0.f && D % 16 == 0 && D <= 128) {
        for (int h = 0; h < nh; h++)
            ATTEND_ONE[kind][D / 16](q + h * D, K, V, KS, VS, lo, g0, g1, p, scale, sc + (int64_t)h * S, S, o + h * D);
        return;
    }
#endif
    for (int h = 0; h < nh; h++) {
        float *sh = sc + (int64_t)h * S, *oh = o + h * D;
        if (kind == KV_F16) attend_plain(q + h * D, K, V, KS, VS, lo, g0, g1, p, D, scale, cap, sh, oh, KV_F16);
        else if (kind == KV_I8) attend_plain(q + h * D, K, V, KS, VS, lo, g0, g1, p, D, scale, cap, sh, oh, KV_I8);
        else attend_plain(q + h * D, K, V, KS, VS, lo, g0, g1, p, D, scale, cap, sh, oh, KV_F32);
    }
}

/* Rotate-half RoPE of one head in place: v[i] = v[i] cos_i + v[i +- D/2] sin_signed_i. */
static inline void rope_head(float *v, const float *cs, const float *sn, int D) {
    float r[512];
    const int hD = D / 2;
    for (int i = 0; i < hD; i++) r[i] = v[i] * cs[i] + v[i + hD] * sn[i];
    for (int i = hD; i < D; i++) r[i] = v[i] * cs[i] + v[i - hD] * sn[i];
    memcpy(v, r, D * sizeof(float));
}

/* One query or key head: its RMSNorm (w: NULL for none), then RoPE, in place. */
static inline void qk_head(float *v, const float *w, float eps, const float *cs,
                           const float *sn, int D, int rot) {
    if (w) rms_norm(v, w, D, eps, v);
    rope_head(v, cs, sn, rot);      /* the first rot dims; the rest pass through */
}

/* Attention of query heads h0 .. h0 + nh - 1 (one KV group or less) of row b. */
static void attend_group(const model_t *m, const layer_t *L, int b, int h0, int nh,
                         const float *qkv, const int64_t *slots, const int64_t *pos,
                         float *scores, float *att) {
    const int D = m->head_dim, S = m->max_seq, nq = m->n_heads * D, nk = m->n_kv * D;
    const int kh = h0 / (m->n_heads / m->n_kv);
    const int64_t row0 = ((int64_t)slots[b] * m->n_kv + kh) * kv_rows(m, L),
                  at = row0 * D * KV_ESZ[m->kv_kind];
    const int i8 = m->kv_kind == KV_I8;
    attend(qkv + (int64_t)b * (nq + 2 * nk) + h0 * D, (const char *)L->kc + at,
           (const char *)L->vc + at, i8 ? L->ks + row0 : NULL, i8 ? L->vs + row0 : NULL,
           kv_span(m, L, (int)pos[b]), D, m->attn_scale, m->attn_softcap, scores + ((int64_t)b * m->n_heads + h0) * S, S,
           att + (int64_t)b * nq + h0 * D, nh, m->kv_kind);
}

/* Workspace floats slm_linear needs. */
int64_t slm_linear_work_floats(const lin_t *L, int B, int n_threads) {
    return ((int64_t)B * L->k + 64) / 4 + 4 * (int64_t)B * (L->k / QBLOCK) + 16 + 16
           + (n_threads * priv_bytes(B, L->k)) / 4 + 64;
}

/* One linear on B rows (for tests and the kernel benchmark): y [B, n] = L(x [B, k]);
 * work: slm_linear_work_floats(L, B, n_threads) floats. */
int slm_linear(const lin_t *L, int B, const float *x, float *y, float *work, int n_threads) {
    act_t a;
    a.q = (int8_t *)work;
    a.d = (float *)(a.q + B * L->k + 64);
    a.c = a.d + B * L->k / QBLOCK;
    a.cg = a.c + B * L->k / QBLOCK;
    a.zs = (int32_t *)(a.cg + B * L->k / QBLOCK);
    a.rs = 1;
    a.priv_bytes = priv_bytes(B, L->k);
    a.priv = (int8_t *)(a.zs + B * L->k / QBLOCK + 16);
    a.priv += (64 - ((uintptr_t)a.priv & 63)) & 63;
    spin_bar_t bar = {0};
    a.bar = &bar;
    #pragma omp parallel num_threads(n_threads)
    {
        bar_join(&bar);
        prep(L, x, B, &a);
        lin_multi(L, 1, x, &a, B, y);
    }
    return 0;
}

/* Rows ids[0..N) of an 8- or 4-bit quantized embedding table (QuantEmbedding: codes
 * [V, D] or two per byte, fp16 scales and uint8 zeros [V, G], zero 2^(bits-1) when
 * symmetric): out [N, D] = (code - zero) * scale, the float ops torch's dequantize does
 * (0.17 ms through torch for 8 rows, a few us here). */
int slm_embed_rows(const uint8_t *qw, const uint16_t *scales, const uint8_t *zeros, int bits,
                   int group, int D, int G, int V, const int64_t *ids, int N, float *out) {
    const int64_t row_bytes = bits == 4 ? D / 2 : D;
    const float sym_zero = bits == 4 ? 8.f : 128.f;
    for (int n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V) return -1;
    for (int n = 0; n < N; n++) {
        const uint8_t *q = qw + ids[n] * row_bytes;
        const uint16_t *s = scales + ids[n] * G;
        const uint8_t *z = zeros ? zeros + ids[n] * G : NULL;
        float *o = out + (int64_t)n * D;
        for (int d = 0; d < D; d++) {
            const int g = d / group;
            const int code = bits == 4 ? (q[d >> 1] >> ((d & 1) * 4)) & 15 : q[d];
            o[d] = ((float)code - (z ? (float)z[g] : sym_zero)) * half_to_float(s[g]);
        }
    }
    return 0;
}

/* max of x[lo..hi) (-inf when empty). */
static float max_range(const float *x, int lo, int hi) {
    float m = -INFINITY;
    int i = lo;
#ifdef SLM_AVX512
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= hi; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; i < hi; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Per-token confidence of one [V] logits row, in two passes (torch's log_softmax, exp, xlogy
 * and topk take ~0.3-0.5 ms per token on 49k logits, this ~0.015 ms):
 * out[0] = log p(token), out[1] = entropy -sum p log p (nats; -inf logits count 0),
 * out[2] = the largest logit other than x[token] (-inf when every other one is -inf). */
void slm_confidence(const float *x, int V, int token, double *out) {
    const float a = max_range(x, 0, token), b = max_range(x, token + 1, V);
    const float other = a > b ? a : b, xt = x[token];
    const float m = xt > other ? xt : other;
    double s = 0.0, t = 0.0;
    int i = 0;
#ifdef SLM_AVX512
    const __m512 mv = _mm512_set1_ps(m), lo = _mm512_set1_ps(-87.f);
    __m512 sv = _mm512_setzero_ps(), tv = _mm512_setzero_ps();
    for (; i + 16 <= V; i += 16) {
        const __m512 d = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv), lo);
        const __m512 e = exp16(d);
        sv = _mm512_add_ps(sv, e);
        tv = _mm512_fmadd_ps(e, d, tv);
    }
    s = _mm512_reduce_add_ps(sv);
    t = _mm512_reduce_add_ps(tv);
#endif
    for (; i < V; i++) {
        const float d = x[i] - m > -87.f ? x[i] - m : -87.f, e = expf(d);
        s += e;
        t += (double)e * d;
    }
    out[0] = (double)xt - m - log(s);
    out[1] = log(s) - t / s;
    out[2] = other;
}

/* Grammar masks: logits[rows[j], t] = -inf wherever bit t % 32 of word t / 32 of mask row j
 * ([n, words] uint32, little-endian bits as llguidance writes them) is clear, t < V. Under
 * AVX-512 a word is two masked 16-lane stores (a JSON grammar forbids most of a row); else
 * each clear bit is written. Either way a row is one pass over its words. */
void slm_mask_rows(float *logits, int V, const int64_t *rows, int n, const uint32_t *mask,
                   int words) {
    for (int j = 0; j < n; j++) {
        float *r = logits + rows[j] * (int64_t)V;
        const uint32_t *m = mask + (int64_t)j * words;
        int w = 0;
#ifdef SLM_AVX512
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (; w < words && (w + 1) * 32 <= V; w++) {
            const uint32_t off = ~m[w];
            if (!off) continue;
            _mm512_mask_storeu_ps(r + w * 32, (__mmask16)(off & 0xFFFF), ninf);
            _mm512_mask_storeu_ps(r + w * 32 + 16, (__mmask16)(off >> 16), ninf);
        }
#endif
        for (; w < words && w * 32 < V; w++) {
            uint32_t off = ~m[w];
            while (off) {
                const int t = w * 32 + __builtin_ctz(off);
                if (t >= V) break;
                r[t] = -INFINITY;
                off &= off - 1;
            }
        }
    }
}

/* out[b] = index of the first maximum of row b of x [B, n] (torch.argmax's tie rule; the
 * engine's greedy pick: torch's argmax runs one element at a time, 0.33 ms for 8 x 49152).
 * Rows are shared out between threads from 4 rows on. */
void slm_argmax(const float *x, int B, int n, int64_t *out) {
    #pragma omp parallel for schedule(static) if (B >= 4)
    for (int b = 0; b < B; b++) {
        const float *r = x + (int64_t)b * n;
        const float m = max_range(r, 0, n);
        int64_t at = 0;
        int i = 0;
#ifdef SLM_AVX512
        const __m512 bm = _mm512_set1_ps(m);
        for (; i + 16 <= n; i += 16) {
            __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + i), bm, _CMP_EQ_OQ);
            if (hit) { at = i + __builtin_ctz(hit); goto found; }
        }
#endif
        for (; i < n; i++) if (r[i] == m) { at = i; goto found; }
    found:
        out[b] = at;
    }
}

/* Workspace floats the step needs for B rows (the caller allocates it). */
static int64_t moe_floats(const model_t *m, int B);   /* below, with the experts */
int64_t slm_work_floats(const model_t *m, int B) {
    int64_t nq = (int64_t)m->n_heads * m->head_dim, nk = (int64_t)m->n_kv * m->head_dim;
    int64_t kmax = m->hidden > m->inter ? m->hidden : m->inter;
    if (nq > kmax) kmax = nq;
    int64_t f = B * (m->hidden * 2 + (nq + 2 * nk) + nq + 2 * (int64_t)m->inter + m->inter);
    f += (int64_t)B * m->n_heads * m->max_seq;         /* attention scores */
    f += moe_floats(m, B);
    f += B * kmax / 4 + 6 * B * kmax / QBLOCK + 64;  /* act_t: q, d, c, cg, zs (and slack) */
    f += (m->n_threads * priv_bytes(B, kmax) + 128) / 4;   /* the threads' interleaved copies */
    return f;
}

int slm_has_vnni(void) {
#ifdef SLM_VNNI
    return 1;
#else
    return 0;
#endif
}

/* One decode step. h [B, hidden]: embeddings in, final hidden states out (before the norm);
 * slots/pos [B]: cache slot and position of each row's new token; logits [B, vocab]. */
/* prefill 1: the B rows are consecutive positions of one sequence (a prompt chunk): keys and
 * values are all written before any row attends, and only the last row's logits are made.
 * prefill 2 (verify): runs of consecutive positions of one or more sequences (speculative
 * decoding's drafts): keys and values all written before any row attends, logits of every
 * row. Each row's arithmetic is that of a decode step, so its logits are bit-identical. */
/* ------------------------------------------------------------------ mixture of experts
 * A layer's B rows make B * top_k (row, expert) assignments. moe_route picks each row's
 * experts; moe_group sorts the assignments by expert, so each chosen expert's weights are
 * read once for all the rows it got (lin_rows over the gathered rows); moe_combine adds a
 * row's expert outputs up (in expert order, as transformers' loop over experts does) and
 * the gated shared expert. Buffers (moe_t) sit in the step's workspace. */
#define MOE_MAX_K 64     /* most experts per token (the step's stack arrays) */
typedef struct {
    float *route;       /* [B, n_exp] router logits, then probabilities */
    int32_t *sel;       /* [B * top_k] expert of each assignment (row-major by row) */
    float *wt;          /* [B * top_k] its weight */
    int32_t *ord;       /* [B * top_k] assignments sorted by expert */
    int32_t *at;        /* [B * top_k] where each assignment sits in ord */
    int32_t *gst;       /* [n_exp + 1] expert e's assignments are ord[gst[e] .. gst[e + 1]) */
    float *x, *gu, *act, *y;   /* gathered rows [B * top_k, hidden], gate|up, act, down */
    act_t a;            /* the gathered rows' quantized activations (quantized experts), in
                         * sorted order, laid out for width kq = max(hidden, moe_inter) */
    int kq;
} moe_t;

static inline int moe_kq(const model_t *m, const layer_t *L) {
    return m->hidden > L->moe_inter ? m->hidden : L->moe_inter;
}

static int64_t moe_floats(const model_t *m, int B) {
    int64_t f = 0;
    for (int l = 0; l < m->n_layers; l++) {
        const layer_t *L = &m->layers[l];
        if (!L->n_exp) continue;
        const int64_t n = (int64_t)B * L->top_k, kq = moe_kq(m, L);
        const int64_t g = (int64_t)B * L->n_exp + 4 * n + L->n_exp + 1
                        + n * (2 * (int64_t)m->hidden + 3 * (int64_t)L->moe_inter) + 64
                        + n * kq / 4 + 4 * n * kq / QBLOCK + 64
                        + (m->n_threads * priv_bytes(B, kq) + 128) / 4;
        if (g > f) f = g;
    }
    return f;
}

static moe_t moe_buffers(const model_t *m, const layer_t *L, int B, float *w, const act_t *a) {
    moe_t e;
    const int64_t n = (int64_t)B * L->top_k;
    e.route = w;
    e.sel = (int32_t *)(e.route + (int64_t)B * L->n_exp);
    e.wt = (float *)(e.sel + n);
    e.ord = (int32_t *)(e.wt + n);
    e.at = e.ord + n;
    e.gst = e.at + n;
    e.x = (float *)(e.gst + L->n_exp + 1);
    e.x += (16 - ((uintptr_t)e.x / sizeof(float)) % 16) % 16;     /* 64-byte aligned rows */
    e.gu = e.x + n * m->hidden;
    e.act = e.gu + n * 2 * L->moe_inter;
    e.y = e.act + n * L->moe_inter;
    e.kq = moe_kq(m, L);
    e.a = *a;           /* rs, bar */
    e.a.d = e.y + n * m->hidden;
    e.a.c = e.a.d + n * e.kq / QBLOCK;
    e.a.cg = e.a.c + n * e.kq / QBLOCK;
    e.a.zs = (int32_t *)(e.a.cg + n * e.kq / QBLOCK);
    e.a.q = (int8_t *)(e.a.zs + n * e.kq / QBLOCK);
    e.a.priv_bytes = priv_bytes(B, e.kq);
    e.a.priv = e.a.q + n * e.kq + 64;
    e.a.priv += (64 - ((uintptr_t)e.a.priv & 63)) & 63;
    return e;
}

/* The quantized activations of the gathered rows from sorted position g0 on, as an act_t
 * whose row 0 is that position (each expert reads its own rows; the layout is for width
 * kq, so any k <= kq and any group size fit). */
static inline act_t moe_view(const moe_t *e, int g0) {
    act_t v = e->a;
    const int64_t nb = e->kq / QBLOCK;
    v.q = e->a.q + (int64_t)g0 * e->kq;
    v.d = e->a.d + g0 * nb;
    v.c = e->a.c + g0 * nb;
    v.cg = e->a.cg + g0 * nb;
    v.zs = e->a.zs + g0 * nb;
    return v;
}

/* Sorted position i's expert. */
static inline int moe_expert(const moe_t *e, int i) { return e->sel[e->ord[i]]; }

/* Quantize gathered row i (x holds the gathered rows at stride L->k) for its expert's
 * linear L: row i - gst[e] of expert e's view, at stride L->k as the kernels read it. */
static inline void moe_prep(const moe_t *e, const lin_t *L, const float *x, int i) {
    if (L->kind == LIN_F32) return;
    const int g0 = e->gst[moe_expert(e, i)];
    act_t v = moe_view(e, g0);
    prep_row(L, x + (int64_t)g0 * L->k, i - g0, &v);
}

/* Row b's experts: softmax over the router's logits, the top_k largest (the lower index on
 * a tie), renormalised over those when norm_topk. */
static void moe_route(const layer_t *L, const float *x, int H, int b, moe_t *e) {
    const int E = L->n_exp, K = L->top_k;
    float *p = e->route + (int64_t)b * E, mx = -INFINITY, sum = 0.f;
    for (int i = 0; i < E; i++) {
        p[i] = dot_f32(L->router + (int64_t)i * H, x + (int64_t)b * H, H);
        mx = p[i] > mx ? p[i] : mx;
    }
    for (int i = 0; i < E; i++) { p[i] = expf(p[i] - mx); sum += p[i]; }
    float top = 0.f;
    for (int j = 0; j < K; j++) {
        int best = -1;
        for (int i = 0; i < E; i++) {
            int taken = 0;
            for (int t = 0; t < j; t++) taken |= e->sel[b * K + t] == i;
            if (!taken && (best < 0 || p[i] > p[best])) best = i;
        }
        e->sel[b * K + j] = best;
        e->wt[b * K + j] = p[best] / sum;
        top += p[best] / sum;
    }
    if (L->norm_topk)
        for (int j = 0; j < K; j++) e->wt[b * K + j] /= top;
}

/* Counting sort of the B * top_k assignments by expert (one thread). */
static void moe_group(const layer_t *L, int B, moe_t *e) {
    const int E = L->n_exp, n = B * L->top_k;
    for (int i = 0; i <= E; i++) e->gst[i] = 0;
    for (int i = 0; i < n; i++) e->gst[e->sel[i] + 1]++;
    for (int i = 0; i < E; i++) e->gst[i + 1] += e->gst[i];
    for (int i = 0; i < n; i++) e->at[i] = e->gst[e->sel[i]]++;
    for (int i = E; i > 0; i--) e->gst[i] = e->gst[i - 1];     /* back to the starts */
    e->gst[0] = 0;
    for (int i = 0; i < n; i++) e->ord[e->at[i]] = i;
}

/* One stage of the chosen experts' linears (stage 0: gate|up, 1: down): for every expert
 * with rows, its linear over its gathered rows of x (stride k) into y (stride n); tiles
 * (8 rows, or a 16-row panel) shared out over the team. A thread that starts on an
 * expert whose kernels read interleaved activations (int4 from 2 rows, int8 from 8)
 * makes its own copy of that expert's rows first. */
static void moe_lin(const layer_t *L, int stage, const float *x, float *y, const moe_t *e,
                    spin_bar_t *bar) {
    const lin_t *lins = L->exp_lin + (int64_t)stage * L->n_exp;
    const int tpe = (lins[0].n + tile_rows(&lins[0]) - 1) / tile_rows(&lins[0]);
    int used = 0;
    for (int i = 0; i < L->n_exp; i++) used += e->gst[i + 1] > e->gst[i];
    int cur = -1;
    act_t v, vi;
    #pragma omp for schedule(static) nowait
    for (int t = 0; t < used * tpe; t++) {
        int i = -1, u = t / tpe;
        while (u >= 0) { i++; if (e->gst[i + 1] > e->gst[i]) u--; }   /* the (t / tpe)th used */
        const lin_t *Le = &lins[i];
        const int g0 = e->gst[i], rows = e->gst[i + 1] - g0, T = tile_rows(Le);
        const int r0 = (t % tpe) * T, n = Le->n, k = Le->k;
        if (i != cur) {
            cur = i;
            v = moe_view(e, g0);
            vi = v;
#ifdef SLM_VNNI
            if (Le->pw && ((Le->kind == LIN_Q4 && rows >= 2) || (Le->kind == LIN_Q8 && rows >= 8))) {
                interleave_rows(&v, rows, k, e->a.priv + omp_get_thread_num() * e->a.priv_bytes, &vi);
            }
#endif
        }
        lin_rows(Le, x + (int64_t)g0 * k, Le->kind == LIN_Q4 ? &vi : &v, &vi, rows,
                 y + (int64_t)g0 * n, n, 0, r0, r0 + T < n ? r0 + T : n);
    }
    bar_wait(bar);
}

/* Row b's MoE output into out [H]: its experts' outputs times their weights, added in
 * expert order, plus the shared expert's (sh, or NULL) times sigmoid(shared_gate . x). */
static void moe_combine(const layer_t *L, const moe_t *e, int b, int H, const float *x,
                        const float *sh, float *out) {
    const int K = L->top_k;
    int done[MOE_MAX_K] = {0};
    float w[MOE_MAX_K];
    const float *y[MOE_MAX_K];
    for (int j = 0; j < K; j++) {
        int best = -1;        /* the next of the row's experts in expert order */
        for (int t = 0; t < K; t++)
            if (!done[t] && (best < 0 || e->sel[b * K + t] < e->sel[b * K + best])) best = t;
        done[best] = 1;
        w[j] = e->wt[b * K + best];
        y[j] = e->y + (int64_t)e->at[b * K + best] * H;
    }
    const float g = !sh ? 0.f : !L->shared_gate ? 1.f
                  : 1.f / (1.f + expf(-dot_f32(L->shared_gate, x + (int64_t)b * H, H)));
    for (int i = 0; i < H; i++) {     /* out may be sh: element i is read before written */
        float acc = 0.f;
        for (int j = 0; j < K; j++) acc += w[j] * y[j][i];
        out[i] = sh ? acc + g * sh[i] : acc;
    }
}

static int step(const model_t *m, int B, float *h, const int64_t *slots, const int64_t *pos,
                float *logits, float *work, int prefill) {
    const int H = m->hidden, D = m->head_dim, nq = m->n_heads * D, nk = m->n_kv * D;
    const int I = m->inter, S = m->max_seq, grp = m->n_heads / m->n_kv;
    int kmax = H > I ? H : I;
    if (nq > kmax) kmax = nq;
    float *xn = work, *tmp = xn + B * H, *qkv = tmp + B * H, *att = qkv + B * (nq + 2 * nk);
    float *gu = att + B * nq, *act = gu + B * 2 * I, *scores = act + B * I;
    float *moe = scores + (int64_t)B * m->n_heads * S;
    act_t a;
    a.q = (int8_t *)(moe + moe_floats(m, B));
    a.d = (float *)(a.q + B * kmax) ;
    a.c = a.d + B * kmax / QBLOCK;
    a.cg = a.c + B * kmax / QBLOCK;
    a.zs = (int32_t *)(a.cg + B * kmax / QBLOCK);
    a.rs = 1;
    a.priv_bytes = priv_bytes(B, kmax);
    a.priv = (int8_t *)(a.zs + B * kmax / QBLOCK + 16);
    a.priv += (64 - ((uintptr_t)a.priv & 63)) & 63;
    /* heads per attention item: a KV group once there are two items per thread */
    const int hpi = B * m->n_kv >= 2 * m->n_threads && grp <= 64 ? grp : 1;

    /* Stages are separated by bar_wait (~9 per layer, after nowait worksharing loops); work
     * that only needs its own row (residual, norm, activation quantization, SiLU) is fused
     * into one row loop. */
    spin_bar_t bar = {0};
    a.bar = &bar;
    #pragma omp parallel num_threads(m->n_threads)
    {
        bar_join(&bar);
        #pragma omp for schedule(static) nowait
        for (int b = 0; b < B; b++) {
            rms_norm(h + b * H, m->layers[0].norm1, H, m->eps, xn + b * H);
            prep_row(&m->layers[0].qkv[0], xn, b, &a);
        }
        bar_wait(&bar);
        for (int l = 0; l < m->n_layers; l++) {
            const layer_t *L = &m->layers[l];
            kvpf_t pf;
            const int kvpf = hpi == grp && !prefill && B >= 4;
            if (kvpf) kvpf_plan(m, L, B, slots, pos, &pf);
            lin_multi_pf(L->qkv, L->n_qkv, xn, &a, B, qkv, kvpf ? &pf : NULL);
            if (hpi == grp && !prefill) {
                /* one item per (row, KV head): RoPE on its key and query heads, key and value
                 * into the cache, attention for the group (one barrier for all of it) */
                #pragma omp for schedule(static) nowait
                for (int it = 0; it < B * m->n_kv; it++) {
                    const int b = it / m->n_kv, kh = it % m->n_kv;
                    float *row = qkv + (int64_t)b * (nq + 2 * nk);
                    const float *cs = (L->cos ? L->cos : m->cos) + pos[b] * m->rot,
                                *sn = (L->sin_signed ? L->sin_signed : m->sin_signed) + pos[b] * m->rot;
                    qk_head(row + nq + kh * D, L->kn, m->eps, cs, sn, D, m->rot);
                    kv_put(m, L, slots[b], kh, pos[b], row);
                    for (int h = kh * grp; h < (kh + 1) * grp; h++) qk_head(row + h * D, L->qn, m->eps, cs, sn, D, m->rot);
                    attend_group(m, L, b, kh * grp, grp, qkv, slots, pos, scores, att);
                }
                bar_wait(&bar);
            } else {
                #pragma omp for schedule(static) nowait
                for (int b = 0; b < B; b++) {      /* RoPE on q and k, then k/v into the cache */
                    float *row = qkv + (int64_t)b * (nq + 2 * nk);
                    const float *cs = (L->cos ? L->cos : m->cos) + pos[b] * m->rot,
                                *sn = (L->sin_signed ? L->sin_signed : m->sin_signed) + pos[b] * m->rot;
                    for (int hh = 0; hh < m->n_heads + m->n_kv; hh++)
                        qk_head(row + hh * D, hh < m->n_heads ? L->qn : L->kn, m->eps, cs, sn, D, m->rot);
                    for (int kh = 0; kh < m->n_kv; kh++) {
                        kv_put(m, L, slots[b], kh, pos[b], row);
                    }
                }
                bar_wait(&bar);
                /* attention: one item per (row, head) when there are too few (row, KV head)
                 * items to share out; each head computes the same thing either way */
                #pragma omp for schedule(static) nowait
                for (int it = 0; it < B * m->n_heads; it++)
                    attend_group(m, L, it / m->n_heads, it % m->n_heads, 1, qkv, slots, pos, scores, att);
                bar_wait(&bar);
            }
            prep(&L->o, att, B, &a);
            lin_multi(&L->o, 1, att, &a, B, tmp);
            moe_t e;
            if (L->n_exp) e = moe_buffers(m, L, B, moe, &a);
            #pragma omp for schedule(static) nowait
            for (int b = 0; b < B; b++) {
                if (L->norm_ao) rms_norm(tmp + b * H, L->norm_ao, H, m->eps, tmp + b * H);
                for (int i = 0; i < H; i++) h[b * H + i] += m->resid_mult * tmp[b * H + i];
                rms_norm(h + b * H, L->norm2, H, m->eps, xn + b * H);
                if (L->n_gu) prep_row(&L->gu[0], xn, b, &a);
                if (L->n_exp) moe_route(L, xn, H, b, &e);
            }
            bar_wait(&bar);
            if (L->n_exp) {     /* sort the assignments by expert, then gather their rows */
                #pragma omp for schedule(static) nowait
                for (int i = 0; i < 1; i++) moe_group(L, B, &e);
                bar_wait(&bar);
                #pragma omp for schedule(static) nowait
                for (int i = 0; i < B * L->top_k; i++) {
                    memcpy(e.x + (int64_t)i * H, xn + (int64_t)(e.ord[i] / L->top_k) * H, H * sizeof(float));
                    moe_prep(&e, &L->exp_lin[moe_expert(&e, i)], e.x, i);
                }
                if (!L->n_gu) bar_wait(&bar);    /* else the shared expert's first barrier */
            }
            if (L->n_gu) {      /* the MLP, or a MoE layer's shared expert */
                const int Il = L->n_gu == 2 ? L->gu[0].n : L->gu[0].n / 2;
                lin_multi(L->gu, L->n_gu, xn, &a, B, gu);
                #pragma omp for schedule(static) nowait
                for (int b = 0; b < B; b++) {      /* SiLU(gate) * up, 16 at a time */
                    for (int i0 = 0; i0 < Il; i0 += 16)
                        (m->act ? gelu_tanh_mul : silu_mul)(
                            gu + (int64_t)b * 2 * Il + i0, gu + (int64_t)b * 2 * Il + Il + i0,
                            act + (int64_t)b * Il + i0, Il - i0 < 16 ? Il - i0 : 16);
                    prep_row(&L->down, act, b, &a);
                }
                bar_wait(&bar);
                lin_multi(&L->down, 1, act, &a, B, tmp);
            }
            if (L->n_exp) {     /* the chosen experts: gate|up, activation, down */
                const int MI = L->moe_inter;
                moe_lin(L, 0, e.x, e.gu, &e, &bar);
                #pragma omp for schedule(static) nowait
                for (int i = 0; i < B * L->top_k; i++) {
                    for (int i0 = 0; i0 < MI; i0 += 16)
                        (m->act ? gelu_tanh_mul : silu_mul)(
                            e.gu + (int64_t)i * 2 * MI + i0, e.gu + (int64_t)i * 2 * MI + MI + i0,
                            e.act + (int64_t)i * MI + i0, MI - i0 < 16 ? MI - i0 : 16);
                    moe_prep(&e, &L->exp_lin[L->n_exp + moe_expert(&e, i)], e.act, i);
                }
                bar_wait(&bar);
                moe_lin(L, 1, e.act, e.y, &e, &bar);
            }
            /* residual, then the next layer's input norm (or the final norm) and its
             * activation quantization */
            const float *next_norm = l + 1 < m->n_layers ? m->layers[l + 1].norm1 : m->final_norm;
            const lin_t *next = l + 1 < m->n_layers ? &m->layers[l + 1].qkv[0] : &m->lm_head;
            #pragma omp for schedule(static) nowait
            for (int b = 0; b < B; b++) {
                if (L->n_exp) moe_combine(L, &e, b, H, xn, L->n_gu ? tmp + b * H : NULL, tmp + b * H);
                if (L->norm_mo) rms_norm(tmp + b * H, L->norm_mo, H, m->eps, tmp + b * H);
                for (int i = 0; i < H; i++) h[b * H + i] += m->resid_mult * tmp[b * H + i];
                if (m->tap && l + 1 == m->tap_after) memcpy(m->tap + (int64_t)b * H, h + (int64_t)b * H, H * sizeof(float));
                rms_norm(h + b * H, next_norm, H, m->eps, xn + b * H);
                prep_row(next, xn, b, &a);
            }
            bar_wait(&bar);
        }
        if (prefill == 1) {   /* the last row only: a view of its quantized activations */
            const int k = m->lm_head.k, G = k / m->lm_head.group;
            act_t last = a;
            last.q = a.q + (int64_t)(B - 1) * k;
            last.d = a.d + (int64_t)(B - 1) * (k / QBLOCK);
            last.c = a.c + (int64_t)(B - 1) * (k / QBLOCK);
            last.cg = a.cg + (int64_t)(B - 1) * G;
            last.zs = a.zs + (int64_t)(B - 1) * (k / QBLOCK);
            lin_multi(&m->lm_head, 1, xn + (int64_t)(B - 1) * H, &last, 1, logits);
        } else {
            lin_multi(&m->lm_head, 1, xn, &a, B, logits);
        }
    }
    return 0;
}

int slm_decode(const model_t *m, int B, float *h, const int64_t *slots, const int64_t *pos,
               float *logits, float *work) {
    return step(m, B, h, slots, pos, logits, work, 0);
}

/* A prompt chunk of T tokens at positions start.. of one cache slot; logits [V] of the last. */
int slm_prefill(const model_t *m, int T, float *h, const int64_t *slots, const int64_t *pos,
                float *logits, float *work) {
    return step(m, T, h, slots, pos, logits, work, 1);
}

/* Rows that may continue one another within a slot (positions ascending per slot); logits
 * [B, vocab] of every row. */
int slm_verify(const model_t *m, int B, float *h, const int64_t *slots, const int64_t *pos,
               float *logits, float *work) {
    return step(m, B, h, slots, pos, logits, work, 2);
}
