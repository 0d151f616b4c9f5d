/* The quantizer's entropy loss on a CPU, forward and backward, fused. tokscale.tokenizers.quantizer compiles it
 * for this machine at first use, once per code dimension (-DCODE_DIM=D; tokscale.native), and keeps its PyTorch
 * slices when it cannot. Same mathematics as quantizer._SearchEntropy, whose docstring derives it:
 *
 *   d_ij  = (x_ij + ||e_j||^2) + ||z_i||^2,   x_ij = sum_k z_ik cm2_kj,   cm2 = -2 codes^T  (D, K)
 *   s_ij  = max(dist_i / T - d_ij / T, floor)  (dist_i the nearest code's distance, so the row maximum is ~0)
 *   e_ij  = exp(s_ij)
 *
 * forward:  Z_i = sum_j e_ij,  sd_i = sum_j e_ij s_ij,  colsum_j += sum_i e_ij / Z_i
 * backward: c_i = inv_z_i sum_j e_ij g_j + neg_sbar_i,  te_ij = (s_ij + c_i - g_j) e_ij,
 *           gz_ik = sum_j te_ij cm2_kj,  acc_kj += sum_i rhs_ik te_ij  (rhs (n, D + 1), acc (D + 1, K))
 *
 * The PyTorch slices make a dozen passes over every (rows, K) slice, each reading and writing it; here a block of
 * R rows goes through one loop over the codes that computes the logits, the exponentials and every forward sum in
 * registers (the D code coordinates loaded once for the R rows, the exponential inlined and vectorised with the
 * rest); the backward adds short passes over the block's R x K buffers, which stay in the L2 cache. The
 * summation order differs from PyTorch's: the results agree to rounding, not bit for bit
 * (tests/tokenizers/test_quantizer_chunked.py). The caller splits the rows over threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef CODE_DIM
#error "compile with -DCODE_DIM=<the code dimension>"
#endif
#define D CODE_DIM
#define R 4 /* rows per block */

/* exp(x) for x in [floor, ~0] (floor >= -87, so that 2^n stays a normal float): x = n ln2 + f with |f| <= ln2 / 2,
 * e^f by a degree-7 polynomial with Cephes' expf coefficients (relative error < 1e-7 over [-60, 0], measured
 * against double exp), 2^n put into the exponent bits. Inline, so that the loops below vectorise it with
 * everything else instead of calling libmvec once per vector (measured: 1.4x the forward's speed). */
static inline float exp_neg(float x) {
    const float n = rintf(x * 1.44269504088896341f);
    const float f = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x)); /* fused: -ffast-math cannot reorder it */
    const float p = ((((1.9875691500e-4f * f + 1.3981999507e-3f) * f + 8.3334519073e-3f) * f + 4.1665795894e-2f) * f +
                     1.6666665459e-1f) * f + 5.0000001201e-1f;
    const float ef = (p * f) * f + f + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23};
    return ef * scale.f;
}

/* Row r's logit and exponential at code j (zr, dt, zs: the block's rows; cj: code j's coordinates). */
#define LOGIT(r)                                                \
    do {                                                        \
        float x_ = 0.0f;                                        \
        for (int k = 0; k < D; k++) x_ += zr[r][k] * cj[k];     \
        const float d_ = (x_ + csq[j]) + zs[r];                 \
        sv[r] = fmaxf(dt[r] - d_ * inv_t, floor_);              \
        ev[r] = exp_neg(sv[r]);                                 \
    } while (0)

/* Declares sv[R], ev[R]: the block's logits and exponentials at code j, the code loaded once for the R rows. */
#define BLOCK_LOGITS                                            \
    float sv[R], ev[R];                                         \
    do {                                                        \
        float cj[D];                                            \
        for (int k = 0; k < D; k++) cj[k] = cm2[k * K + j];     \
        LOGIT(0);                                               \
        LOGIT(1);                                               \
        LOGIT(2);                                               \
        LOGIT(3);                                               \
    } while (0)

static void load_rows(int64_t i0, int rows, const float *restrict z, const float *restrict zsq,
                      const float *restrict dist, float inv_t, float zr[R][D], float zs[R], float dt[R]) {
    for (int r = 0; r < R; r++) {
        const int64_t i = i0 + (r < rows ? r : 0); /* a short last block repeats its first row, results unused */
        for (int k = 0; k < D; k++) zr[r][k] = z[i * D + k];
        zs[r] = zsq[i];
        dt[r] = dist[i] * inv_t;
    }
}

/* Returns 0, or 1 when the block buffer could not be allocated. */
int entropy_forward(int64_t n, int64_t K, const float *restrict z, const float *restrict cm2,
                    const float *restrict csq, const float *restrict zsq, const float *restrict dist, float inv_t,
                    float floor_, float *restrict z_part, float *restrict s_dot, float *restrict colsum) {
    float *ebuf = malloc(sizeof(float) * R * (size_t)K);
    if (!ebuf) return 1;
    for (int64_t i0 = 0; i0 < n; i0 += R) {
        const int rows = (int)(n - i0 < R ? n - i0 : R);
        float zr[R][D], zs[R], dt[R];
        load_rows(i0, rows, z, zsq, dist, inv_t, zr, zs, dt);
        float z0 = 0, z1 = 0, z2 = 0, z3 = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        float *e0 = ebuf, *e1 = ebuf + K, *e2 = ebuf + 2 * K, *e3 = ebuf + 3 * K;
#pragma omp simd reduction(+ : z0, z1, z2, z3, s0, s1, s2, s3)
        for (int64_t j = 0; j < K; j++) {
            BLOCK_LOGITS;
            e0[j] = ev[0], e1[j] = ev[1], e2[j] = ev[2], e3[j] = ev[3];
            z0 += ev[0], z1 += ev[1], z2 += ev[2], z3 += ev[3];
            s0 += ev[0] * sv[0], s1 += ev[1] * sv[1], s2 += ev[2] * sv[2], s3 += ev[3] * sv[3];
        }
        const float zp[R] = {z0, z1, z2, z3}, sd[R] = {s0, s1, s2, s3};
        float w[R];
        for (int r = 0; r < R; r++) {
            w[r] = r < rows ? 1.0f / zp[r] : 0.0f;
            if (r < rows) z_part[i0 + r] = zp[r], s_dot[i0 + r] = sd[r];
        }
#pragma omp simd
        for (int64_t j = 0; j < K; j++) colsum[j] += ((e0[j] * w[0] + e1[j] * w[1]) + e2[j] * w[2]) + e3[j] * w[3];
    }
    free(ebuf);
    return 0;
}

int entropy_backward(int64_t n, int64_t K, const float *restrict z, const float *restrict cm2,
                     const float *restrict csq, const float *restrict zsq, const float *restrict dist, float inv_t,
                     float floor_, const float *restrict g, const float *restrict inv_z,
                     const float *restrict neg_sbar, const float *restrict rhs, float *restrict gz,
                     float *restrict acc) {
    float *buf = malloc(sizeof(float) * 2 * R * (size_t)K); /* s then te (R rows), e (R rows) */
    if (!buf) return 1;
    float *t0 = buf, *t1 = buf + K, *t2 = buf + 2 * K, *t3 = buf + 3 * K;
    float *e0 = buf + 4 * K, *e1 = buf + 5 * K, *e2 = buf + 6 * K, *e3 = buf + 7 * K;
    for (int64_t i0 = 0; i0 < n; i0 += R) {
        const int rows = (int)(n - i0 < R ? n - i0 : R);
        float zr[R][D], zs[R], dt[R];
        load_rows(i0, rows, z, zsq, dist, inv_t, zr, zs, dt);
        float b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : b0, b1, b2, b3)
        for (int64_t j = 0; j < K; j++) {
            BLOCK_LOGITS;
            t0[j] = sv[0], t1[j] = sv[1], t2[j] = sv[2], t3[j] = sv[3];
            e0[j] = ev[0], e1[j] = ev[1], e2[j] = ev[2], e3[j] = ev[3];
            const float gj = g[j];
            b0 += ev[0] * gj, b1 += ev[1] * gj, b2 += ev[2] * gj, b3 += ev[3] * gj;
        }
        const float gb[R] = {b0, b1, b2, b3};
        float c[R], w[R][D + 1];
        for (int r = 0; r < R; r++) {
            const int64_t i = i0 + (r < rows ? r : 0);
            c[r] = gb[r] * inv_z[i] + neg_sbar[i];
            for (int k = 0; k <= D; k++) w[r][k] = r < rows ? rhs[i * (D + 1) + k] : 0.0f;
        }
        /* te in place of s, and acc_kj += sum_r rhs_rk te_rj: acc read and written once per block */
#pragma omp simd
        for (int64_t j = 0; j < K; j++) {
            const float gj = g[j];
            const float a0 = (t0[j] + c[0] - gj) * e0[j], a1 = (t1[j] + c[1] - gj) * e1[j];
            const float a2 = (t2[j] + c[2] - gj) * e2[j], a3 = (t3[j] + c[3] - gj) * e3[j];
            t0[j] = a0, t1[j] = a1, t2[j] = a2, t3[j] = a3;
            for (int k = 0; k <= D; k++)
                acc[k * K + j] += ((a0 * w[0][k] + a1 * w[1][k]) + a2 * w[2][k]) + a3 * w[3][k];
        }
        /* gz_rk = sum_j te_rj cm2_kj, two rows per pass over the codes */
        for (int p = 0; p < R; p += 2) {
            const float *ta = buf + p * K, *tb = buf + (p + 1) * K;
            float ga[D] = {0}, gb2[D] = {0};
            for (int64_t j = 0; j < K; j++) {
                const float xa = ta[j], xb = tb[j];
                for (int k = 0; k < D; k++) {
                    const float cm = cm2[k * K + j];
                    ga[k] += xa * cm;
                    gb2[k] += xb * cm;
                }
            }
            for (int k = 0; k < D; k++) {
                if (p < rows) gz[(i0 + p) * D + k] = ga[k];
                if (p + 1 < rows) gz[(i0 + p + 1) * D + k] = gb2[k];
            }
        }
    }
    free(buf);
    return 0;
}
