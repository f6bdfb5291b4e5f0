/* The compute ceiling of the int4 8-row tile, on one core (bench/vnni_ceiling.py builds and
 * runs this). Prints one line per measurement: "name rate" in VNNI instructions per ns.
 *
 *   vnni_alone        16 vpdpbusd (8 accumulators, activation bytes broadcast from memory)
 *   vnni_cvt_mul_fma  the same 16, plus per 8 of them one int->float conversion, one
 *                     multiply and one multiply-add: what q4_panel spends per 32-column
 *                     block and activation row
 *   vnni_cvt_fma      the same without the multiply
 *   q4_panel_8        decode.c's int4 tile, 8 activation rows, groups of 32, k = 576,
 *                     8 panels (36 KB of weights: L1/L2, so memory is not in the way)
 *
 * decode.c is included whole (DECODE_C, set by the driver) so the tile runs as compiled
 * for the engine. */
#include DECODE_C
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define VB(r, s, o) "vpdpbusd " #o "(%0)%{1to16%}, %%zmm" #s ", %%zmm" #r "\n\t"
#define V16 VB(0, 20, 0) VB(1, 20, 8) VB(2, 20, 16) VB(3, 20, 24) VB(4, 20, 32) VB(5, 20, 40) \
    VB(6, 20, 48) VB(7, 20, 56) VB(0, 21, 4) VB(1, 21, 12) VB(2, 21, 20) VB(3, 21, 28)     \
    VB(4, 21, 36) VB(5, 21, 44) VB(6, 21, 52) VB(7, 21, 60)
#define CMF "vcvtdq2ps %%zmm8, %%zmm9\n\t" "vmulps %%zmm10, %%zmm11, %%zmm12\n\t" \
    "vfmadd231ps %%zmm9, %%zmm12, %%zmm13\n\t"
#define CF "vcvtdq2ps %%zmm8, %%zmm9\n\t" "vfmadd231ps %%zmm9, %%zmm11, %%zmm13\n\t"
#define CLOBBER "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", \
    "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm20", "xmm21"

static int32_t buf[16] __attribute__((aligned(64)));

static double rate_alone(long n) {
    double t = now();
    for (long i = 0; i < n; i++) __asm__ volatile(V16 :: "r"(buf) : CLOBBER);
    return n * 16.0 / (now() - t) / 1e9;
}
static double rate_cmf(long n) {
    double t = now();
    for (long i = 0; i < n; i++) __asm__ volatile(V16 CMF CMF :: "r"(buf) : CLOBBER);
    return n * 16.0 / (now() - t) / 1e9;
}
static double rate_cf(long n) {
    double t = now();
    for (long i = 0; i < n; i++) __asm__ volatile(V16 CF CF :: "r"(buf) : CLOBBER);
    return n * 16.0 / (now() - t) / 1e9;
}

static double rate_panel(long iters) {
    const int k = 576, np = 8, C = 8, nb = k / QBLOCK;
    lin_t L = {0};
    L.kind = LIN_Q4; L.n = 16 * np; L.k = k; L.group = 32;
    uint8_t *pw = aligned_alloc(64, (size_t)np * (k / 8) * 64);
    float *psc = aligned_alloc(64, (size_t)np * nb * 16 * 4), *pzf = aligned_alloc(64, (size_t)np * nb * 16 * 4);
    srand(1);
    for (long i = 0; i < (long)np * (k / 8) * 64; i++) pw[i] = (uint8_t)rand();
    for (int i = 0; i < np * nb * 16; i++) { psc[i] = 0.01f; pzf[i] = 8.f; }
    L.pw = pw; L.psc = psc; L.pzf = pzf;
    act_t a = {0};
    a.rs = C;
    a.q = aligned_alloc(64, (size_t)C * k);
    for (int i = 0; i < C * k; i++) a.q[i] = (int8_t)(rand() % 255 - 127);
    a.d = aligned_alloc(64, sizeof(float) * C * nb);
    a.c = aligned_alloc(64, sizeof(float) * C * nb);
    a.zs = aligned_alloc(64, sizeof(int32_t) * C * nb);
    for (int i = 0; i < C * nb; i++) { a.d[i] = 0.1f; a.c[i] = 1.f; a.zs[i] = -100; }
    float out[128];
    double t = now();
    for (long it = 0; it < iters; it++)
        for (int p = 0; p < np; p++) {
            q4_panel_8_0(&L, p, &a, 0, out, 0);
            __asm__ volatile("" :: "r"(out) : "memory");
        }
    const double dt = now() - t, vnni = (double)iters * np * (k / 8) * 2 * C;
    free(pw); free(psc); free(pzf); free(a.q); free(a.d); free(a.c); free(a.zs);
    return vnni / dt / 1e9;
}

int main(int argc, char **argv) {
    const long n = argc > 1 ? atol(argv[1]) : 20000000L;
    printf("vnni_alone %.3f\n", rate_alone(n));
    printf("vnni_cvt_mul_fma %.3f\n", rate_cmf(n));
    printf("vnni_cvt_fma %.3f\n", rate_cf(n));
    printf("q4_panel_8 %.3f\n", rate_panel(n / 250));
    return 0;
}
