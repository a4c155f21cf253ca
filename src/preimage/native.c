/* The engine step's own arithmetic for the CPU, in one pass over memory each (see native.py).
 *
 * preimage_update: the regularizers' gradients (N_alpha, eq. 5; TV^beta with beta = 2, section
 *   3.2.2), Algorithm 1 (lines 5-7) and the projection onto the B+ ball (eq. 6, line 8), in place on the canvas
 *   x (N, C, H, W) and Algorithm 1's state G, mu; the same arithmetic as fused.fused_update.
 * preimage_l2_f32 / preimage_l2_bf16: the inversion loss (eq. 2) per element,
 *   scale[n] * ||code - target||^2, and its gradient 2 * scale[n] * (code - target), as
 *   fused.squared_distance.
 * preimage_crop / preimage_uncrop: the jitter crop (eq. 7) with the network's input conversion
 *   (division by std, bf16, channels-last), and its gradient into the canvas.
 * preimage_update_window / preimage_window_canvas: preimage_update reading the data term's gradient
 *   where it lies, in the windows (window_t), with no canvas-sized gradient; and that gradient
 *   written out, for the other paths.
 * preimage_dsift_normalize / _backward: DSIFT's descriptor normalization (plain arithmetic).
 * preimage_maxpool / _backward: max pooling with a one-byte index (models/pooling.py).
 * preimage_lrn / _backward: Caffe's cross-channel LRN and its gradient (models/caffe.py).
 * preimage_hog_pool / _backward: HOG's bilinear spatial pooling into cells and its transpose (representations/hog.py).
 * preimage_hog_orientations: HOG's orientation assignment, libvl's scan on every pixel (representations/hog.py).
 * preimage_hog_normalize / _backward: HOG's UoCTTI block normalization and its transpose (representations/hog.py).
 * preimage_dsift_maps / _backward: DSIFT's orientation maps in plain arithmetic and their transpose (representations/dsift.py).
 *
 * Each reads its inputs once and writes its outputs once; inner loops run over the image's
 * columns (or the code's memory) and are vectorized by the compiler.  Threads (OpenMP) share
 * contiguous ranges of rows (or of memory); per-element sums go through per-thread partial sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
static int omp_thread(void) { return omp_get_thread_num(); }
static int omp_threads(void) { return omp_get_num_threads(); }
#else
static int omp_thread(void) { return 0; }
static int omp_threads(void) { return 1; }
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch; NaN stays a (quiet) NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : r);
}

/* A gradient w.r.t. the jitter windows, read where it lies (native.py, window_update / window_canvas):
 * the canvas gradient is zero outside each element's window, and at window pixel (i, j) of element n,
 * channel c it is
 *     v * scale[n] / div[c],   v = data[n sn + c sc + a sa + y sy + b sb + x sx],
 *     (a, y) = divmod(i + top, s), (b, x) = divmod(j + left, s)   (zero where a >= A or b >= Bw),
 * the multiplication and division each applied only where scale / div are given.  With s = 1 this is a
 * plain (N, C, H, W) tensor of any strides (a convolution's input gradient); with s > 1 the phases of
 * a strided first layer (representations/affine.py), read without reshuffling them into an image.
 * desc: bf16, s, A, Bw, top, left, sn, sc, sa, sy, sb, sx, H, W (the window's size). */
typedef struct {
    const void *data;
    const int64_t *offsets;
    const float *div, *scale;
    int64_t bf16, s, A, Bw, top, left, sn, sc, sa, sy, sb, sx, H, W;
} window_t;

static window_t window_of(const void *data, const int64_t *desc, const int64_t *offsets, const float *div,
                          const float *scale) {
    window_t g = {data, offsets, div, scale, desc[0], desc[1], desc[2], desc[3], desc[4], desc[5],
                  desc[6], desc[7], desc[8], desc[9], desc[10], desc[11], desc[12], desc[13]};
    return g;
}

#define AS_FLOAT(v) (v)

/* columns [0, span) of one channel's row into o, from phases whose blocks (sb values apart) each
 * hold s contiguous pixels, the first block entered at pixel left % s; whole blocks with a constant
 * s where it is 2 or 4, which the compiler turns into vector conversions */
#define BLOCK_COPY(T, CONVERT, S)                                                                     \
    for (; j + (S) <= span; j += (S), block += g->sb)                                                 \
        for (int64_t q = 0; q < (S); q++) o[j + q] = CONVERT(block[q]);
#define BLOCK_ROW(T, CONVERT)                                                                         \
    do {                                                                                              \
        const int64_t s = g->s, x0 = g->left % s;                                                     \
        const T *block = (const T *)g->data + first + (g->left / s) * g->sb;                          \
        int64_t j = 0;                                                                                \
        if (x0) { /* the rest of the first block */                                                   \
            j = s - x0 < span ? s - x0 : span;                                                        \
            for (int64_t q = 0; q < j; q++) o[q] = CONVERT(block[x0 + q]);                            \
            block += g->sb;                                                                           \
        }                                                                                             \
        if (s == 4) {                                                                                 \
            BLOCK_COPY(T, CONVERT, 4)                                                                 \
        } else if (s == 2) {                                                                          \
            BLOCK_COPY(T, CONVERT, 2)                                                                 \
        } else {                                                                                      \
            BLOCK_COPY(T, CONVERT, s)                                                                 \
        }                                                                                             \
        for (int64_t q = 0; q < span - j; q++) o[j + q] = CONVERT(block[q]); /* a partial block */    \
    } while (0)

/* canvas row rr of element n, channel c (Wc wide) into out */
static void window_row(const window_t *g, int64_t n, int64_t c, int64_t rr, int64_t Wc, float *out) {
    const int64_t i = rr - g->offsets[2 * n], c0 = g->offsets[2 * n + 1];
    memset(out, 0, (size_t)Wc * sizeof(float));
    if (i < 0 || i >= g->H) return;
    const int64_t ii = i + g->top, a = ii / g->s, y = ii % g->s;
    if (a >= g->A) return;
    const float k = g->scale ? g->scale[n] : 1.0f, d = g->div ? g->div[c] : 1.0f;
    const int64_t first = n * g->sn + c * g->sc + a * g->sa + y * g->sy;
    float *o = out + c0;
    /* columns written: the window's, up to the end of the phases */
    const int64_t span = g->W < g->Bw * g->s - g->left ? g->W : g->Bw * g->s - g->left;
    if (g->s > 1 && g->sx == 1 && span > 0) { /* each block's s pixels contiguous: copied block by block */
        if (g->bf16)
            BLOCK_ROW(uint16_t, bf16_to_f32);
        else
            BLOCK_ROW(float, AS_FLOAT);
    } else for (int64_t x = 0; x < g->s; x++) {
        /* window columns j = b s + x - left, 0 <= j < W, b < Bw */
        int64_t b0 = 0, b1 = (g->W - 1 + g->left - x) / g->s + 1;
        if (g->left > x) b0 = (g->left - x + g->s - 1) / g->s;
        if (g->W - 1 + g->left - x < 0) b1 = 0;
        if (b1 > g->Bw) b1 = g->Bw;
        if (b0 >= b1) continue;
        float *oj = o + b0 * g->s + x - g->left;
        const int64_t os = g->s, is = g->sb, cnt = b1 - b0;
        if (g->bf16) {
            const uint16_t *src = (const uint16_t *)g->data + first + x * g->sx + b0 * is;
            if (os == 1 && is == 1) {
#pragma omp simd
                for (int64_t q = 0; q < cnt; q++) oj[q] = bf16_to_f32(src[q]);
            } else {
                for (int64_t q = 0; q < cnt; q++) oj[q * os] = bf16_to_f32(src[q * is]);
            }
        } else {
            const float *src = (const float *)g->data + first + x * g->sx + b0 * is;
            if (os == 1 && is == 1) {
                memcpy(oj, src, (size_t)cnt * sizeof(float));
            } else {
                for (int64_t q = 0; q < cnt; q++) oj[q * os] = src[q * is];
            }
        }
    }
    /* scale and divisor over the columns written (those beyond the image stay exactly zero) */
    if (g->scale) {
#pragma omp simd
        for (int64_t j = 0; j < span; j++) o[j] = o[j] * k;
    }
    if (g->div) {
#pragma omp simd
        for (int64_t j = 0; j < span; j++) o[j] = o[j] / d;
    }
}

/* canvas row rr of element n, all C channels (Wc wide each, channel c at out + c ostride) into out */
static void window_rows(const window_t *g, int64_t n, int64_t C, int64_t rr, int64_t Wc, float *out,
                        int64_t ostride) {
    const int64_t i = rr - g->offsets[2 * n], c0 = g->offsets[2 * n + 1], ii = i + g->top;
    const int64_t W = g->W < g->Bw - g->left ? g->W : g->Bw - g->left;
    /* colour channels interleaved (channels-last, one phase): each pixel's three values together */
    if (C == 3 && g->s == 1 && g->sc == 1 && g->sb == 3 && i >= 0 && i < g->H && ii < g->A && W > 0) {
        float *o0 = out, *o1 = out + ostride, *o2 = out + 2 * ostride;
        for (int c = 0; c < 3; c++) {
            float *o = c == 0 ? o0 : c == 1 ? o1 : o2;
            memset(o, 0, (size_t)c0 * sizeof(float));
            memset(o + c0 + W, 0, (size_t)(Wc - c0 - W) * sizeof(float));
        }
        o0 += c0, o1 += c0, o2 += c0;
        const int64_t first = n * g->sn + ii * g->sa + g->left * 3;
        if (g->bf16) {
            const uint16_t *src = (const uint16_t *)g->data + first;
            for (int64_t j = 0; j < W; j++) {
                o0[j] = bf16_to_f32(src[3 * j]);
                o1[j] = bf16_to_f32(src[3 * j + 1]);
                o2[j] = bf16_to_f32(src[3 * j + 2]);
            }
        } else {
            const float *src = (const float *)g->data + first;
            for (int64_t j = 0; j < W; j++) {
                o0[j] = src[3 * j];
                o1[j] = src[3 * j + 1];
                o2[j] = src[3 * j + 2];
            }
        }
        if (g->scale) {
            const float k = g->scale[n];
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                o0[j] = o0[j] * k;
                o1[j] = o1[j] * k;
                o2[j] = o2[j] * k;
            }
        }
        if (g->div) {
            const float d0 = g->div[0], d1 = g->div[1], d2 = g->div[2];
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                o0[j] = o0[j] / d0;
                o1[j] = o1[j] / d1;
                o2[j] = o2[j] / d2;
            }
        }
        return;
    }
    for (int64_t c = 0; c < C; c++) window_row(g, n, c, rr, Wc, out + c * ostride);
}

/* one old row of the canvas, all channels, with its first and last columns repeated on either
 * side: differences across the image border are then exactly zero, as in the padded form */
static void load_row(float *dst, const float *x, int64_t C, int64_t HW, int64_t W, int64_t stride) {
    for (int64_t c = 0; c < C; c++) {
        float *d = dst + c * stride;
        memcpy(d + 1, x + c * HW, (size_t)W * sizeof(float));
        d[0] = d[1];
        d[W + 1] = d[W];
    }
}

static int update(float *x, const float *grad, const window_t *win, float *G, float *mu, int64_t N, int64_t C,
                  int64_t H, int64_t W, double alpha, double B, double B_plus, double V, double lambda_alpha,
                  double lambda_tv, double rho, float lr, float *e_range, float *e_tv, int threads) {
    const int64_t HW = H * W, rows = N * H, stride = W + 2;
    const float inv_B2 = (float)(1.0 / (B * B));
    const float ra = (float)(lambda_alpha * alpha / (B * B * (double)HW));
    const float k = (float)(1.0 / (V * V * (double)HW));
    const float rt = (float)(2.0 * (1.0 / (V * V * (double)HW)) * lambda_tv); /* as fused.py rounds it */
    const float rho_f = (float)rho, bp = (float)B_plus, inv_lr = 1.0f / lr;
    const float half_alpha_m1 = (float)(alpha / 2 - 1);
    const int alpha6 = alpha == 6.0;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = (int)rows;
    int failed = 0;
    double *sums = calloc((size_t)threads * (size_t)N * 2, sizeof(double));
    float *halo = malloc((size_t)threads * 2 * (size_t)C * (size_t)stride * sizeof(float));
    if (!sums || !halo) {
        free(sums);
        free(halo);
        return 1; /* out of memory */
    }

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_thread(), nt = omp_threads();
        const int64_t start = rows * t / nt, end = rows * (t + 1) / nt;
        float *up_halo = halo + (size_t)t * 2 * C * stride, *down_halo = up_halo + C * stride;
        /* the rows this range reads but a neighbouring thread rewrites: copied before anyone writes */
        if (start < end && start % H != 0)
            load_row(up_halo, x + (start / H) * C * HW + (start % H - 1) * W, C, HW, W, stride);
        if (start < end && end % H != 0 && end < rows)
            load_row(down_halo, x + (end / H) * C * HW + (end % H) * W, C, HW, W, stride);
#pragma omp barrier
        float *buf = malloc((size_t)(3 * C * stride + (win ? 2 : 1) * C * W + 3 * W) * sizeof(float));
        if (buf && start < end) {
            float *prev = buf, *cur = buf + C * stride, *next = buf + 2 * C * stride;
            float *xn = buf + 3 * C * stride, *s = xn + C * W, *p = s + W, *nrm = p + W, *gw = nrm + W;
            double *er = sums + (size_t)t * N * 2, *et = er + N;
            int have_prev = 0;
            for (int64_t r = start; r < end; r++) {
                const int64_t n = r / H, h = r % H, base = n * C * HW + h * W;
                if (r == start || h == 0) load_row(cur, x + base, C, HW, W, stride);
                if (h == 0) {
                    have_prev = 0;
                } else if (r == start) {
                    memcpy(prev, up_halo, (size_t)C * stride * sizeof(float));
                    have_prev = 1;
                }
                const float *up = have_prev ? prev : cur;
                const float *down = cur;
                if (h < H - 1) {
                    if (r + 1 == end) memcpy(next, down_halo, (size_t)C * stride * sizeof(float));
                    else load_row(next, x + base + W, C, HW, W, stride);
                    down = next;
                }
                if (win) window_rows(win, n, C, h, W, gw, W);
                /* N_alpha: s = ||x||^2 / B^2, p = s^(alpha/2 - 1) */
                for (int64_t w = 0; w < W; w++) s[w] = 0.0f;
                for (int64_t c = 0; c < C; c++) {
                    const float *xc = cur + c * stride + 1;
#pragma omp simd
                    for (int64_t w = 0; w < W; w++) s[w] += xc[w] * xc[w];
                }
                float acc_r = 0.0f, acc_t = 0.0f;
#pragma omp simd reduction(+ : acc_r)
                for (int64_t w = 0; w < W; w++) {
                    const float sw = s[w] * inv_B2;
                    const float pw = alpha6 ? sw * sw : powf(sw, half_alpha_m1);
                    p[w] = pw * ra;
                    acc_r += pw * sw;
                    nrm[w] = 0.0f;
                }
                for (int64_t c = 0; c < C; c++) {
                    const float *xc = cur + c * stride + 1, *uc = up + c * stride + 1, *dc = down + c * stride + 1;
                    const float *gc = win ? gw + c * W : grad + base + c * HW;
                    float *Gc = G + base + c * HW, *mc = mu + base + c * HW, *xnc = xn + c * W;
#pragma omp simd reduction(+ : acc_t)
                    for (int64_t w = 0; w < W; w++) {
                        const float dl = xc[w] - xc[w - 1], dr = xc[w + 1] - xc[w];
                        const float du = xc[w] - uc[w], dd = dc[w] - xc[w];
                        acc_t += dr * dr + dd * dd;
                        const float lap = dl - dr + du - dd;
                        const float g = gc[w] + xc[w] * p[w] + lap * rt;
                        const float Gw = Gc[w] * rho_f + g * g;
                        const float mw = mc[w] * rho_f - g / (sqrtf(Gw) + inv_lr);
                        const float xw = xc[w] + mw;
                        Gc[w] = Gw;
                        mc[w] = mw;
                        xnc[w] = xw;
                        nrm[w] += xw * xw;
                    }
                }
                /* projection onto the B+ ball, per pixel */
#pragma omp simd
                for (int64_t w = 0; w < W; w++) {
                    const float nw = sqrtf(nrm[w]);
                    nrm[w] = bp / (nw > bp ? nw : bp);
                }
                for (int64_t c = 0; c < C; c++) {
                    float *out = x + base + c * HW;
                    const float *xnc = xn + c * W;
#pragma omp simd
                    for (int64_t w = 0; w < W; w++) out[w] = xnc[w] * nrm[w];
                }
                er[n] += acc_r;
                et[n] += acc_t;
                /* roll the old rows: this row becomes the previous one */
                float *tmp = prev;
                prev = cur;
                cur = next;
                next = tmp;
                have_prev = 1;
            }
        } else if (!buf && start < end) {
#pragma omp atomic write
            failed = 1;
        }
        free(buf);
    }
    for (int64_t n = 0; n < N; n++) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < threads; t++) {
            a += sums[(size_t)t * N * 2 + n];
            b += sums[(size_t)t * N * 2 + N + n];
        }
        e_range[n] = (float)(a / (double)HW);
        e_tv[n] = (float)(b * (double)k);
    }
    free(sums);
    free(halo);
    return failed;
}

int preimage_update(float *x, const float *grad, float *G, float *mu, int64_t N, int64_t C, int64_t H,
                    int64_t W, double alpha, double B, double B_plus, double V, double lambda_alpha,
                    double lambda_tv, double rho, float lr, float *e_range, float *e_tv, int threads) {
    return update(x, grad, NULL, G, mu, N, C, H, W, alpha, B, B_plus, V, lambda_alpha, lambda_tv, rho, lr, e_range,
                  e_tv, threads);
}

/* preimage_update with the data term's gradient given as a window_t (desc as window_of reads it) */
int preimage_update_window(float *x, const void *data, const int64_t *desc, const int64_t *offsets,
                           const float *div, const float *scale, float *G, float *mu, int64_t N, int64_t C,
                           int64_t H, int64_t W, double alpha, double B, double B_plus, double V,
                           double lambda_alpha, double lambda_tv, double rho, float lr, float *e_range,
                           float *e_tv, int threads) {
    const window_t win = window_of(data, desc, offsets, div, scale);
    return update(x, NULL, &win, G, mu, N, C, H, W, alpha, B, B_plus, V, lambda_alpha, lambda_tv, rho, lr,
                  e_range, e_tv, threads);
}

#define BLOCK 4096

/* code, target, grad: N elements of M values each, element n at offset n * M (any layout whose
 * batch stride is M: contiguous or channels-last). */
#define L2_KERNEL(NAME, T, LOAD, STORE)                                                                   \
    int NAME(const T *code, const T *target, const float *scale, T *grad, float *value, int64_t N,     \
              int64_t M, int threads) {                                                                 \
        const int64_t total = N * M;                                                                    \
        if (threads < 1) threads = 1;                                                                   \
        double *sums = calloc((size_t)threads * (size_t)N, sizeof(double));                            \
        if (!sums) {                                                                                    \
            return 1;                                                                                   \
        }                                                                                               \
        _Pragma("omp parallel num_threads(threads)") {                                                  \
            const int t = omp_thread(), nt = omp_threads();                                             \
            int64_t i = total * t / nt;                                                                 \
            const int64_t end = total * (t + 1) / nt;                                                   \
            double *part = sums + (size_t)t * N;                                                        \
            while (i < end) {                                                                           \
                const int64_t n = i / M;                                                                \
                int64_t stop = (n + 1) * M < end ? (n + 1) * M : end;                                   \
                if (stop - i > BLOCK) stop = i + BLOCK;                                                 \
                const float two_s = 2.0f * scale[n];                                                    \
                float acc = 0.0f;                                                                       \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t j = i; j < stop; j++) {             \
                    const float d = LOAD(code[j]) - LOAD(target[j]);                                    \
                    acc += d * d;                                                                       \
                    grad[j] = STORE(d * two_s);                                                         \
                }                                                                                       \
                part[n] += acc;                                                                         \
                i = stop;                                                                               \
            }                                                                                           \
        }                                                                                               \
        for (int64_t n = 0; n < N; n++) {                                                               \
            double a = 0.0;                                                                             \
            for (int t = 0; t < threads; t++) a += sums[(size_t)t * N + n];                             \
            value[n] = (float)a * scale[n];                                                             \
        }                                                                                               \
        free(sums);                                                                                     \
        return 0;                                                                                       \
    }


#define SAME(v) (v)
L2_KERNEL(preimage_l2_f32, float, SAME, SAME)
L2_KERNEL(preimage_l2_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* preimage_crop: the jitter crop of eq. (7) and the model's input conversion in one pass.
 *   out[n] = canvas[n, :, r_n : r_n + H, c_n : c_n + W] / div   (offsets[n] = (r_n, c_n))
 * canvas: (N, C, Hc, Wc) fp32, contiguous; div: C per-channel divisors, or NULL for none (the
 * division is a true one, as torch's x / std); out: (N, C, H, W) in fp32 or bf16 (rounded to
 * nearest even), NCHW or, with nhwc, channels-last (N, H, W, C) memory.  Threads share rows. */
int preimage_crop(const float *canvas, const int64_t *offsets, const float *div, void *out, int64_t N, int64_t C,
                  int64_t Hc, int64_t Wc, int64_t H, int64_t W, int bf16, int nhwc, int threads) {
    const int64_t rows = N * H;
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_thread(), nt = omp_threads();
        const int64_t start = rows * t / nt, end = rows * (t + 1) / nt;
        float *row = malloc((size_t)(W > 0 ? W : 1) * sizeof(float));
        if (!row && start < end) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t q = start; row && q < end; q++) {
            const int64_t n = q / H, i = q % H;
            const float *src = canvas + (n * C * Hc + offsets[2 * n] + i) * Wc + offsets[2 * n + 1];
            if (nhwc && C == 3 && !div) { /* the common case, colour images: interleave directly */
                const float *s0 = src, *s1 = src + Hc * Wc, *s2 = src + 2 * Hc * Wc;
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + (n * H + i) * W * 3;
                    for (int64_t j = 0; j < W; j++) {
                        o[3 * j] = f32_to_bf16(s0[j]);
                        o[3 * j + 1] = f32_to_bf16(s1[j]);
                        o[3 * j + 2] = f32_to_bf16(s2[j]);
                    }
                } else {
                    float *o = (float *)out + (n * H + i) * W * 3;
                    for (int64_t j = 0; j < W; j++) {
                        o[3 * j] = s0[j];
                        o[3 * j + 1] = s1[j];
                        o[3 * j + 2] = s2[j];
                    }
                }
                continue;
            }
            for (int64_t c = 0; c < C; c++) {
                const float *s = src + c * Hc * Wc;
                if (!bf16 && !nhwc && !div) {
                    memcpy((float *)out + ((n * C + c) * H + i) * W, s, (size_t)W * sizeof(float));
                    continue;
                }
                if (div) {
                    const float d = div[c];
#pragma omp simd
                    for (int64_t j = 0; j < W; j++) row[j] = s[j] / d;
                } else {
                    memcpy(row, s, (size_t)W * sizeof(float));
                }
                const int64_t step = nhwc ? C : 1;
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + (nhwc ? (n * H + i) * W * C + c : ((n * C + c) * H + i) * W);
                    for (int64_t j = 0; j < W; j++) o[j * step] = f32_to_bf16(row[j]);
                } else {
                    float *o = (float *)out + (nhwc ? (n * H + i) * W * C + c : ((n * C + c) * H + i) * W);
                    for (int64_t j = 0; j < W; j++) o[j * step] = row[j];
                }
            }
        }
        free(row);
    }
    return failed;
}

/* preimage_window_canvas: a window_t's canvas gradient, written out: out (N, C, Hc, Wc) fp32, contiguous.
 * Threads share the canvas rows (n, row), all channels of a row together. */
int preimage_window_canvas(const void *data, const int64_t *desc, const int64_t *offsets, const float *div,
                           const float *scale, float *out, int64_t N, int64_t C, int64_t Hc, int64_t Wc,
                           int threads) {
    const window_t win = window_of(data, desc, offsets, div, scale);
    const int64_t rows = N * Hc;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < rows; q++) {
        const int64_t n = q / Hc, rr = q % Hc;
        window_rows(&win, n, C, rr, Wc, out + (n * C * Hc + rr) * Wc, Hc * Wc);
    }
    return 0;
}

/* preimage_uncrop: the gradient of preimage_crop.  out (N, C, Hc, Wc) fp32, contiguous, becomes
 * grad / div inside each element's window and zero elsewhere; grad (N, C, H, W), fp32 or bf16,
 * has any strides (in elements: sn, sc, sh, sw), e.g. a view into a padded tensor. */
int preimage_uncrop(const void *grad, const int64_t *offsets, const float *div, float *out, int64_t N, int64_t C,
                    int64_t Hc, int64_t Wc, int64_t H, int64_t W, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                    int bf16, int threads) {
    const int64_t desc[14] = {bf16, 1, H, W, 0, 0, sn, sc, sh, 0, sw, 0, H, W};
    return preimage_window_canvas(grad, desc, offsets, div, NULL, out, N, C, Hc, Wc, threads);
}

/* DSIFT's descriptor normalization in plain arithmetic (representations/dsift.py, _normalize and
 * _normalize_backward; VLFeat's _vl_dsift_normalize_histogram and cyvlfeat's scaling): per frame,
 *   c = min(h / n1, 0.2), n1 = sqrt(sum h^2) + eps;  out = min(512 c / n2, 255), n2 = sqrt(sum c^2) + eps,
 * a root of a sum below `tiny` counting as 0 (sums over d in dsift_dot's order).  h: (N, 128, F)
 * with element strides (sn, sd, sf);
 * out: (N, F, 128), contiguous.  The backward pass recomputes the frame's forward from h and
 * maps grad (N, F, 128; strides gn, gf, gd) to gh (N, 128, F; strides on, od, of).  Threads share frames. */
#define DSIFT_D 128

struct dsift_frame {
    float h[DSIFT_D], c[DSIFT_D], o[DSIFT_D];
    float n1, inv1, n2, inv2;
};

/* sum_d a[d] b[d] over a descriptor: 16 partial sums (d mod 16, each in order), then halved
 * pairwise; a fixed order that vectorizes */
static inline float dsift_dot(const float *a, const float *b) {
    float part[16] = {0.0f};
    for (int d = 0; d < DSIFT_D; d += 16)
        for (int l = 0; l < 16; l++) part[l] += a[d + l] * b[d + l];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    return part[0];
}

static void dsift_frame_forward(struct dsift_frame *fr, const float *h, int64_t sd, float eps, float clamp,
                                float tiny) {
    for (int d = 0; d < DSIFT_D; d++) fr->h[d] = h[d * sd];
    const float s1 = dsift_dot(fr->h, fr->h);
    fr->inv1 = s1 >= tiny ? 1.0f / sqrtf(s1) : 0.0f;
    fr->n1 = s1 * fr->inv1 + eps;
    for (int d = 0; d < DSIFT_D; d++) {
        const float c = fr->h[d] / fr->n1;
        fr->c[d] = c < clamp ? c : clamp;
    }
    const float s2 = dsift_dot(fr->c, fr->c);
    fr->inv2 = s2 >= tiny ? 1.0f / sqrtf(s2) : 0.0f;
    fr->n2 = s2 * fr->inv2 + eps;
    for (int d = 0; d < DSIFT_D; d++) fr->o[d] = fr->c[d] / fr->n2 * 512.0f;
}

int preimage_dsift_normalize(const float *h, int64_t sn, int64_t sd, int64_t sf, float *out, int64_t N, int64_t F,
                             float eps, float clamp, float tiny, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        struct dsift_frame fr;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < N * F; q++) {
            const int64_t n = q / F, f = q % F;
            dsift_frame_forward(&fr, h + n * sn + f * sf, sd, eps, clamp, tiny);
            float *o = out + q * DSIFT_D;
            for (int d = 0; d < DSIFT_D; d++) o[d] = fr.o[d] < 255.0f ? fr.o[d] : 255.0f;
        }
    }
    return 0;
}

int preimage_dsift_normalize_backward(const float *h, int64_t sn, int64_t sd, int64_t sf, const float *grad,
                                      int64_t gn, int64_t gf, int64_t gd, float *gh, int64_t on, int64_t od, int64_t of,
                                      int64_t N, int64_t F, float eps, float clamp, float tiny, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        struct dsift_frame fr;
        float gc[DSIFT_D], gv[DSIFT_D];
#pragma omp for schedule(static)
        for (int64_t q = 0; q < N * F; q++) {
            const int64_t n = q / F, f = q % F;
            dsift_frame_forward(&fr, h + n * sn + f * sf, sd, eps, clamp, tiny);
            const float *g = grad + n * gn + f * gf;
            for (int d = 0; d < DSIFT_D; d++) gv[d] = fr.o[d] <= 255.0f ? g[d * gd] * 512.0f : 0.0f;
            const float k2 = dsift_dot(gv, fr.c) * fr.inv2 / fr.n2 / fr.n2;
            for (int d = 0; d < DSIFT_D; d++) {
                const float keep1 = fr.h[d] / fr.n1 <= clamp ? 1.0f : 0.0f;
                gc[d] = (gv[d] / fr.n2 - fr.c[d] * k2) * keep1;
            }
            const float k1 = dsift_dot(gc, fr.h) * fr.inv1 / fr.n1 / fr.n1;
            float *out = gh + n * on + f * of;
            for (int d = 0; d < DSIFT_D; d++) out[d * od] = gc[d] / fr.n1 - fr.h[d] * k1;
        }
    }
    return 0;
}

/* Max pooling with torch's semantics (F.max_pool2d, dilation 1): the window of output o spans
 * input [o*s - p, o*s - p + k) clipped to the image; the first maximum in row-major window order
 * wins, and a NaN replaces the running maximum.  Where torch keeps an int64 index into the input
 * plane, idx keeps one byte per output: the maximum's row-major position in the clipped window,
 * (ih - lo_h) * kw + (iw - lo_w) < kh * kw <= 255.  With relu, the output is relu(max) (= the maximum
 * of the window's ReLUs: the two commute) and idx is POOL_NONE where the maximum is <= 0 (a zero
 * gradient: torch's ReLU passes the gradient where its output is not <= 0, NaN included).  x (N, C, H, W) and y (N, C, OH, OW) are fp32
 * or bf16, NCHW or, with nhwc, channels-last; idx has y's layout; idx may be NULL (forward only).
 * Threads share output rows. */
#define POOL_NONE 255 /* idx: no gradient */

static inline int64_t pool_lo(int64_t o, int64_t s, int64_t p) {
    const int64_t a = o * s - p;
    return a > 0 ? a : 0;
}

static inline int64_t pool_hi(int64_t o, int64_t s, int64_t p, int64_t k, int64_t size) {
    const int64_t b = o * s - p + k;
    return b < size ? b : size;
}

/* channels c0 .. c0 + WIDTH - 1 of output (n, oh, ow), WIDTH <= POOL_LANES: the running maximum and
 * its position stay in registers (POOL_LANES fp32 lanes: one AVX-512 vector) */
#define POOL_LANES 16
#define MAXPOOL_NHWC_LANES(T, LOAD, STORE, WIDTH, RELU)                                                          \
    {                                                                                                      \
        float mv[POOL_LANES];                                                                              \
        int32_t rv[POOL_LANES];                                                                            \
        for (int j = 0; j < POOL_LANES; j++) {                                                             \
            mv[j] = -INFINITY;                                                                             \
            rv[j] = 0;                                                                                     \
        }                                                                                                  \
        for (int64_t ih = h0; ih < h1; ih++) {                                                             \
            for (int64_t iw = w0; iw < w1; iw++) {                                                         \
                const T *src = (const T *)x + ((n * H + ih) * W + iw) * C + c0;                            \
                const int32_t rel = (int32_t)((ih - h0) * kw + (iw - w0));                                 \
                _Pragma("omp simd") for (int j = 0; j < (WIDTH); j++) {                                    \
                    const float v = LOAD(src[j]);                                                          \
                    const int take = (v > mv[j]) | (v != v);                                               \
                    mv[j] = take ? v : mv[j];                                                              \
                    rv[j] = take ? rel : rv[j];                                                            \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        T *dst = (T *)y + o + c0;                                                                          \
        _Pragma("omp simd") for (int j = 0; j < (WIDTH); j++) {                                            \
            const int drop = (RELU) & (mv[j] <= 0.0f); /* relu: 0 and no gradient (NaN passes, as torch) */ \
            dst[j] = STORE(drop ? 0.0f : mv[j]);                                                           \
            rv[j] = drop ? POOL_NONE : rv[j];                                                              \
        }                                                                                                  \
        if (idx)                                                                                           \
            for (int j = 0; j < (WIDTH); j++) idx[o + c0 + j] = (uint8_t)rv[j];                            \
    }

#define MAXPOOL_NHWC(T, LOAD, STORE, RELU)                                                                       \
    for (int64_t ow = 0; ow < OW; ow++) {                                                                  \
        const int64_t w0 = pool_lo(ow, sw, pw), w1 = pool_hi(ow, sw, pw, kw, W);                           \
        const int64_t o = ((n * OH + oh) * OW + ow) * C;                                                   \
        int64_t c0 = 0;                                                                                    \
        for (; c0 + POOL_LANES <= C; c0 += POOL_LANES) MAXPOOL_NHWC_LANES(T, LOAD, STORE, POOL_LANES, RELU)      \
        if (c0 < C) {                                                                                      \
            const int rest = (int)(C - c0);                                                                \
            MAXPOOL_NHWC_LANES(T, LOAD, STORE, rest, RELU)                                                       \
        }                                                                                                  \
    }

#define MAXPOOL_NCHW(T, LOAD, STORE)                                                                       \
    for (int64_t ow = 0; ow < OW; ow++) {                                                                  \
        const int64_t w0 = pool_lo(ow, sw, pw), w1 = pool_hi(ow, sw, pw, kw, W);                           \
        float best = -INFINITY;                                                                            \
        uint8_t at = 0;                                                                                    \
        for (int64_t ih = h0; ih < h1; ih++) {                                                             \
            const T *src = (const T *)x + (plane * H + ih) * W;                                            \
            for (int64_t iw = w0; iw < w1; iw++) {                                                         \
                const float v = LOAD(src[iw]);                                                             \
                if (v > best || v != v) {                                                                  \
                    best = v;                                                                              \
                    at = (uint8_t)((ih - h0) * kw + (iw - w0));                                            \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        const int64_t o = (plane * OH + oh) * OW + ow;                                                     \
        if (relu && best <= 0.0f) {                                                                        \
            best = 0.0f;                                                                                   \
            at = POOL_NONE;                                                                                \
        }                                                                                                  \
        ((T *)y)[o] = STORE(best);                                                                         \
        if (idx) idx[o] = at;                                                                              \
    }

int preimage_maxpool(const void *x, void *y, uint8_t *idx, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                     int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int bf16,
                     int nhwc, int relu, int threads) {
    const int64_t rows = (nhwc ? N : N * C) * OH;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < rows; q++) {
        const int64_t oh = q % OH, h0 = pool_lo(oh, sh, ph), h1 = pool_hi(oh, sh, ph, kh, H);
        if (nhwc) {
            const int64_t n = q / OH;
            if (bf16 && relu) {
                MAXPOOL_NHWC(uint16_t, bf16_to_f32, f32_to_bf16, 1)
            } else if (bf16) {
                MAXPOOL_NHWC(uint16_t, bf16_to_f32, f32_to_bf16, 0)
            } else if (relu) {
                MAXPOOL_NHWC(float, SAME, SAME, 1)
            } else {
                MAXPOOL_NHWC(float, SAME, SAME, 0)
            }
        } else {
            const int64_t plane = q / OH;
            if (bf16) {
                MAXPOOL_NCHW(uint16_t, bf16_to_f32, f32_to_bf16)
            } else {
                MAXPOOL_NCHW(float, SAME, SAME)
            }
        }
    }
    return 0;
}

/* The gradient of preimage_maxpool w.r.t. x, as torch computes it: gx is zeroed, then each
 * output's gradient gy is added at its maximum, outputs in row-major order, so that an input
 * pixel that is the maximum of several overlapping windows receives their gradients in torch's
 * order (in bf16 each addition is rounded, as torch's BFloat16 +=).  gy and idx have y's shape and
 * layout, gx x's.  Threads share images and, when there are fewer images than threads, the
 * channels of an image (channels-last) or planes (NCHW): no two write the same element. */
/* zero input rows [r0, r1) of one image (NHWC: channels [first, first + count) of STEP) or plane */
static void zero_rows(char *gx, int64_t r0, int64_t r1, int64_t W, int64_t step, int64_t first, int64_t count,
                      size_t size) {
    if (r1 <= r0) return;
    if (count == step) {
        memset(gx + (size_t)(r0 * W * step) * size, 0, (size_t)((r1 - r0) * W * step) * size);
        return;
    }
    for (int64_t i = r0 * W; i < r1 * W; i++) memset(gx + (size_t)(i * step + first) * size, 0, (size_t)count * size);
}

/* The input rows are zeroed just before the first output row whose windows reach them, so each
 * row is written while it is still in cache rather than in a pass over the whole image first. */
#define MAXPOOL_SCATTER(T, LOAD, STORE, AT, STEP, FIRST, COUNT)                                            \
    int64_t zeroed = 0;                                                                                    \
    for (int64_t oh = 0; oh < OH; oh++) {                                                                  \
        const int64_t h0 = pool_lo(oh, sh, ph);                                                            \
        const int64_t reach = h0 + kh < H ? h0 + kh : H;                                                   \
        if (reach > zeroed) {                                                                              \
            zero_rows(gx, zeroed, reach, W, STEP, FIRST, COUNT, sizeof(T));                                \
            zeroed = reach;                                                                                \
        }                                                                                                  \
        for (int64_t ow = 0; ow < OW; ow++) {                                                              \
            const int64_t w0 = pool_lo(ow, sw, pw), o = (oh * OW + ow) * STEP + (FIRST);                   \
            T *base = (T *)gx + (h0 * W + w0) * STEP + (FIRST);                                            \
            for (int64_t j = 0; j < (COUNT); j++) {                                                        \
                const int r = idx_n[o + j];                                                                \
                const float g = LOAD(((const T *)gy_n)[o + j]);                                            \
                T *at = base + AT[r] + j;                                                                  \
                *at = STORE(LOAD(*at) + (r == POOL_NONE ? -0.0f : g)); /* x + -0 is x: no branch */        \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    zero_rows(gx, zeroed, H, W, STEP, FIRST, COUNT, sizeof(T)); /* rows no window reaches */

int preimage_maxpool_backward(const void *gy, const uint8_t *idx, void *gx_all, int64_t N, int64_t C, int64_t H,
                              int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                              int64_t ph, int64_t pw, int bf16, int nhwc, int threads) {
    if (threads < 1) threads = 1;
    /* offset of window position r from the window's first pixel, in elements */
    int64_t at_nhwc[256] = {0}, at_nchw[256] = {0}; /* POOL_NONE: the window's first pixel, which gets -0 */
    for (int64_t r = 0; r < kh * kw && r < POOL_NONE; r++) {
        at_nhwc[r] = ((r / kw) * W + r % kw) * C;
        at_nchw[r] = (r / kw) * W + r % kw;
    }
    const size_t size = bf16 ? 2 : 4;
    const int64_t parts = nhwc ? (N >= threads ? 1 : (threads + N - 1) / N) : 1;
    const int64_t items = nhwc ? N * parts : N * C;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < items; q++) {
        if (nhwc) {
            const int64_t n = q / parts, p = q % parts, c_lo = C * p / parts, c_hi = C * (p + 1) / parts;
            char *gx = (char *)gx_all + (size_t)(n * H * W * C) * size;
            const uint8_t *idx_n = idx + n * OH * OW * C;
            const char *gy_n = (const char *)gy + (size_t)(n * OH * OW * C) * size;
            if (bf16) {
                MAXPOOL_SCATTER(uint16_t, bf16_to_f32, f32_to_bf16, at_nhwc, C, c_lo, c_hi - c_lo)
            } else {
                MAXPOOL_SCATTER(float, SAME, SAME, at_nhwc, C, c_lo, c_hi - c_lo)
            }
        } else {
            char *gx = (char *)gx_all + (size_t)(q * H * W) * size;
            const uint8_t *idx_n = idx + q * OH * OW;
            const char *gy_n = (const char *)gy + (size_t)(q * OH * OW) * size;
            if (bf16) {
                MAXPOOL_SCATTER(uint16_t, bf16_to_f32, f32_to_bf16, at_nchw, 1, 0, 1)
            } else {
                MAXPOOL_SCATTER(float, SAME, SAME, at_nchw, 1, 0, 1)
            }
        }
    }
    return 0;
}

/* Caffe's ACROSS_CHANNELS LRN (models/caffe.py, CaffeLRN) and its gradient, in one pass each:
 *     s_c = k + alpha/n * sum_{|c' - c| <= h} x_c'^2,   y_c = x_c * s_c^-beta   (h = (n - 1) / 2,
 *     channels outside [0, C) count as zero),
 *     dx_c = g_c * s_c^-beta - (2 alpha beta / n) * x_c * sum_{|c' - c| <= h} g_c' * y_c' / s_c'.
 * The backward pass recomputes s and s^-beta from x (reading x and g, writing dx) rather than
 * keeping them from the forward pass (lrn_middle: s^-beta for beta = 0.75, every network here,
 * without divisions; other betas by powf).  Arithmetic in fp32; bf16 inputs are widened
 * and outputs rounded once.  x, g, y, dx are (N, C, P) with P = H * W pixels, NCHW or, with nhwc,
 * channels-last.
 *
 * The work goes in blocks held in flat fp32 buffers where a channel's neighbours lie D elements
 * away and missing channels are zeros, so every step is one vectorized loop over the block:
 * channels-last, LRN_PIXELS consecutive pixels, each a run of C channels followed by h zeros (D = 1);
 * NCHW, LRN_LANES pixels of an image as C rows with h zero rows above and below (D = LRN_LANES).
 * Threads share blocks; each has its own buffers (-1: out of memory). */
#define LRN_PIXELS 16
#define LRN_LANES 64

/* The middle of a block, for s = k + an acc[i], u = s^-beta, i < m: the forward pass's output
 * out = x u (gs == NULL), or the backward pass's first term out = g u and t = g x u / s (= g y / s;
 * zero where x is, so the padding stays zero).  With AVX-512 and beta = 0.75: 1 / sqrt by the
 * hardware's estimate (relative error < 2^-14) and one Newton step (~1e-7, fp32's rounding),
 * s^-3/4 = rsqrt(s) rsqrt(s rsqrt(s)), 1 / s = rsqrt(s)^2: no divisions (the divider's sqrt and div
 * cost ~2 cycles per element).  Elsewhere the same in sqrtf and divisions, or powf for other betas. */
#ifdef __AVX512F__
static inline __m512 lrn_rsqrt16(__m512 s) { /* y (1.5 - 0.5 s y^2), y ~ 1 / sqrt(s) */
    const __m512 y = _mm512_rsqrt14_ps(s);
    return _mm512_mul_ps(y, _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), s), _mm512_mul_ps(y, y),
                                             _mm512_set1_ps(1.5f)));
}
#endif

static void lrn_middle(const float *acc, const float *xs, const float *gs, float *out, float *t, int64_t m, float k,
                       float an, float beta) {
    int64_t i = 0;
    if (beta == 0.75f) {
#ifdef __AVX512F__
        const __m512 vk = _mm512_set1_ps(k), van = _mm512_set1_ps(an);
        for (; i + 16 <= m; i += 16) {
            const __m512 s = _mm512_fmadd_ps(van, _mm512_loadu_ps(acc + i), vk), y = lrn_rsqrt16(s);
            const __m512 u = _mm512_mul_ps(y, lrn_rsqrt16(_mm512_mul_ps(s, y))), x = _mm512_loadu_ps(xs + i);
            if (!gs) {
                _mm512_storeu_ps(out + i, _mm512_mul_ps(x, u));
                continue;
            }
            const __m512 gu = _mm512_mul_ps(_mm512_loadu_ps(gs + i), u);
            _mm512_storeu_ps(out + i, gu);
            _mm512_storeu_ps(t + i, _mm512_mul_ps(_mm512_mul_ps(gu, x), _mm512_mul_ps(y, y)));
        }
#endif
        for (; i < m; i++) {
            const float s = k + an * acc[i], q = 1.0f / sqrtf(s), u = q * sqrtf(q);
            if (!gs) {
                out[i] = xs[i] * u;
            } else {
                out[i] = gs[i] * u;
                t[i] = out[i] * xs[i] * (q * q);
            }
        }
        return;
    }
    for (; i < m; i++) {
        const float s = k + an * acc[i], u = powf(s, -beta);
        if (!gs) {
            out[i] = xs[i] * u;
        } else {
            out[i] = gs[i] * u;
            t[i] = out[i] * xs[i] / s;
        }
    }
}

/* sum[i] = sum_{|j| <= h} v[i + j D], i < m (n = 2h + 1 = 5, every network here, in one pass) */
static void lrn_window_sum(const float *v, float *sum, int64_t m, int64_t D, int64_t n) {
    const int64_t h = (n - 1) / 2;
    if (n == 5) {
#pragma omp simd
        for (int64_t i = 0; i < m; i++) sum[i] = (v[i - 2 * D] + v[i - D]) + v[i] + (v[i + D] + v[i + 2 * D]);
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < m; i++) sum[i] = v[i - h * D];
    for (int64_t j = 1; j < n; j++) {
        const float *row = v + (j - h) * D;
#pragma omp simd
        for (int64_t i = 0; i < m; i++) sum[i] += row[i];
    }
}

/* the block's region [0, m) of each buffer (pointers at its start; the buffers extend h D zeros
 * beyond it on either side): the forward (gs == NULL: out = y) or the backward pass (out = dx) */
static void lrn_block(const float *xs, const float *gs, float *out, float *sq, float *acc, float *t, int64_t m,
                      int64_t D, int64_t n, float an, float k, float beta, float c2) {
#pragma omp simd
    for (int64_t i = 0; i < m; i++) sq[i] = xs[i] * xs[i];
    lrn_window_sum(sq, acc, m, D, n);
    lrn_middle(acc, xs, gs, out, t, m, k, an, beta);
    if (!gs) return;
    lrn_window_sum(t, acc, m, D, n);
#pragma omp simd
    for (int64_t i = 0; i < m; i++) out[i] -= c2 * xs[i] * acc[i];
}

/* tensor <-> block: channels-last, pixel p's channel c at src[p C + c] and block[p (C + h) + c];
 * NCHW, channel c of lane l at src[c P + l] and block[c L + l] */
#define LRN_LOAD(T, CONVERT, TENSOR, BLOCK)                                                                \
    if (nhwc) {                                                                                            \
        for (int64_t p = 0; p < width; p++) {                                                              \
            const T *from_ = (const T *)(TENSOR) + p * C;                                                  \
            float *to_ = (BLOCK) + p * (C + h);                                                            \
            _Pragma("omp simd") for (int64_t c = 0; c < C; c++) to_[c] = CONVERT(from_[c]);                \
        }                                                                                                  \
    } else {                                                                                               \
        for (int64_t c = 0; c < C; c++) {                                                                  \
            const T *from_ = (const T *)(TENSOR) + c * P;                                                  \
            float *to_ = (BLOCK) + c * L;                                                                  \
            _Pragma("omp simd") for (int64_t l = 0; l < width; l++) to_[l] = CONVERT(from_[l]);            \
        }                                                                                                  \
    }

#define LRN_STORE(T, CONVERT, BLOCK, TENSOR)                                                               \
    if (nhwc) {                                                                                            \
        for (int64_t p = 0; p < width; p++) {                                                              \
            const float *from_ = (BLOCK) + p * (C + h);                                                    \
            T *to_ = (T *)(TENSOR) + p * C;                                                                \
            _Pragma("omp simd") for (int64_t c = 0; c < C; c++) to_[c] = CONVERT(from_[c]);                \
        }                                                                                                  \
    } else {                                                                                               \
        for (int64_t c = 0; c < C; c++) {                                                                  \
            const float *from_ = (BLOCK) + c * L;                                                          \
            T *to_ = (T *)(TENSOR) + c * P;                                                                \
            _Pragma("omp simd") for (int64_t l = 0; l < width; l++) to_[l] = CONVERT(from_[l]);            \
        }                                                                                                  \
    }

static int lrn(const void *x, const void *g, void *out, int64_t N, int64_t C, int64_t P, int64_t n, float alpha,
               float beta, float k, int bf16, int nhwc, int threads) {
    if (threads < 1) threads = 1;
    const int64_t h = (n - 1) / 2, L = nhwc ? LRN_PIXELS : LRN_LANES, D = nhwc ? 1 : L;
    const int64_t m = nhwc ? L * (C + h) : C * L;                  /* a block's region */
    const int64_t per_image = nhwc ? 0 : (P + L - 1) / L;          /* NCHW blocks per image */
    const int64_t items = nhwc ? (N * P + L - 1) / L : N * per_image; /* channels-last pixels run on */
    const float an = alpha / (float)n, c2 = 2.0f * alpha * beta / (float)n;
    const size_t esize = bf16 ? 2 : 4, span = (size_t)(m + 2 * h * D);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* xs, gs, o, acc, sq, t: span each, the region after h D zeros (which stay zero, as do the
         * h zeros after each channels-last pixel, which the loads never write) */
        float *buf = (float *)calloc(6 * span, sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *xs = buf + h * D, *gs = xs + span, *o = gs + span, *acc = o + span, *sq = acc + span,
                  *t = sq + span;
#pragma omp for schedule(static)
            for (int64_t q = 0; q < items; q++) {
                int64_t width;
                size_t base;
                if (nhwc) { /* pixels q L .. of all images, in a row */
                    width = N * P - q * L < L ? N * P - q * L : L;
                    base = (size_t)(q * L * C) * esize;
                } else {
                    const int64_t img = q / per_image, p0 = (q % per_image) * L;
                    width = P - p0 < L ? P - p0 : L; /* a last, narrower block: stale lanes, never stored */
                    base = (size_t)(img * C * P + p0) * esize;
                }
                const char *xq = (const char *)x + base, *gq = g ? (const char *)g + base : NULL;
                char *oq = (char *)out + base;
                if (bf16) {
                    LRN_LOAD(uint16_t, bf16_to_f32, xq, xs)
                    if (g) { LRN_LOAD(uint16_t, bf16_to_f32, gq, gs) }
                } else {
                    LRN_LOAD(float, SAME, xq, xs)
                    if (g) { LRN_LOAD(float, SAME, gq, gs) }
                }
                lrn_block(xs, g ? gs : NULL, o, sq, acc, t, m, D, n, an, k, beta, c2);
                if (bf16) {
                    LRN_STORE(uint16_t, f32_to_bf16, o, oq)
                } else {
                    LRN_STORE(float, SAME, o, oq)
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

int preimage_lrn(const void *x, void *y, int64_t N, int64_t C, int64_t P, int64_t n, float alpha, float beta,
                 float k, int bf16, int nhwc, int threads) {
    return lrn(x, NULL, y, N, C, P, n, alpha, beta, k, bf16, nhwc, threads);
}

int preimage_lrn_backward(const void *x, const void *g, void *dx, int64_t N, int64_t C, int64_t P, int64_t n,
                          float alpha, float beta, float k, int bf16, int nhwc, int threads) {
    return lrn(x, g, dx, N, C, P, n, alpha, beta, k, bf16, nhwc, threads);
}

/* HOG's central differences (representations/hog.py, _central_differences) and the end of its
 * backward pass (hog._backward after the pooling's transpose).
 *
 * Forward: at each interior pixel (i, x) of the (N, C, H, W) image, (H', W') = (H - 2, W - 2), each
 * channel's gx = I(i, x + 1) - I(i, x - 1), gy = I(i + 1, x) - I(i - 1, x) and g2 = gx gx + gy gy (two
 * rounded products and a rounded sum); the channel with the largest g2, the first on ties, gives
 * gx, gy, g2 (N, H', W') and, where C > 1, channel (int32).
 *
 * Backward: from the gradients of the pooled terms' values, G_m = grad0 for |g| and, for HOGb,
 * G_e = grad1 (else NULL), radial = G_m + G_e along and tangential = G_e across (across a tensor,
 * or NULL for the scalar across_k), the gradient of g = (gx, gy) is radial u + tangential
 * (-uy, ux), with u = g / max(|g|, tiny) the unit gradient (0 at null gradients) from the forward
 * pass's g and |g| (the orientation scan's magnitude), in hog._backward's order of operations
 * (torch's addcmul_ rounds once: fmaf); the image's gradient out (N, C, H, W) is its central
 * differences' adjoint, in the selected channel (channel, or the only one), each sample summed as
 * _central_differences_adjoint does: + gx of its left neighbour, - gx of its right one, + gy of
 * the one above, - gy of the one below.  Threads share rows.  The results are those of the
 * PyTorch code, bit for bit. */
int preimage_hog_differences(const float *image, int64_t N, int64_t C, int64_t H, int64_t W, float *gx, float *gy,
                             float *g2, int32_t *channel, int threads) {
    const int64_t Hi = H - 2, Wi = W - 2;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < N * Hi; q++) {
        const int64_t n = q / Hi, i = q % Hi, o = q * Wi;
        const float *p = image + (n * C * H + i + 1) * W + 1; /* channel 0, pixel (i + 1, 1) */
        float *rx = gx + o, *ry = gy + o, *r2 = g2 + o;
#pragma omp simd
        for (int64_t x = 0; x < Wi; x++) {
            const float a = p[x + 1] - p[x - 1], b = p[x + W] - p[x - W], sq = a * a;
            rx[x] = a;
            ry[x] = b;
            r2[x] = sq + b * b;
        }
        if (channel)
            for (int64_t x = 0; x < Wi; x++) channel[o + x] = 0;
        for (int64_t c = 1; c < C; c++) {
            const float *pc = p + c * H * W;
#pragma omp simd
            for (int64_t x = 0; x < Wi; x++) {
                const float cx = pc[x + 1] - pc[x - 1], cy = pc[x + W] - pc[x - W];
                float c2 = cx * cx;
                c2 = c2 + cy * cy;
                const int better = c2 > r2[x];
                rx[x] = better ? cx : rx[x];
                ry[x] = better ? cy : ry[x];
                r2[x] = better ? c2 : r2[x];
                channel[o + x] = better ? (int32_t)c : channel[o + x];
            }
        }
    }
    return 0;
}

/* what the backward pass reads per interior pixel (see above) */
struct hog_terms {
    const float *grad0, *grad1, *along, *across, *gx, *gy, *magnitude;
    float across_k, tiny;
};

/* the gradient of g on one interior row (o: its offset, Wi pixels) into dx, dy */
static inline void hog_gradient_row(const struct hog_terms *t, int64_t o, int64_t Wi, float *dx, float *dy) {
    for (int64_t x = 0; x < Wi; x++) {
        const int64_t i = o + x;
        const float m = t->magnitude[i], inverse = 1.0f / (m < t->tiny ? t->tiny : m);
        const float ux = t->gx[i] * inverse, uy = t->gy[i] * inverse;
        if (t->grad1) { /* torch's addcmul_: one rounding (fmaf) */
            const float radial = fmaf(t->grad1[i], t->along[i], t->grad0[i]);
            const float tangential = t->grad1[i] * (t->across ? t->across[i] : t->across_k);
            dx[x] = fmaf(-tangential, uy, radial * ux);
            dy[x] = fmaf(tangential, ux, radial * uy);
        } else {
            dx[x] = t->grad0[i] * ux;
            dy[x] = t->grad0[i] * uy;
        }
    }
}

static inline float hog_selected(const int32_t *channel, int64_t i, int64_t c, float v) {
    return channel == NULL || channel[i] == c ? v : 0.0f;
}

/* sample x of an output row of channel c: + gx (row xr) of its left neighbour, - of its right one,
 * + gy of the one above (row ya), - of the one below (yb); their channels cx, ca, cb (or NULL) */
static inline float hog_adjoint_sample(const float *xr, const float *ya, const float *yb, const int32_t *cx,
                                       const int32_t *ca, const int32_t *cb, int64_t c, int64_t x, int64_t W) {
    float v = 0.0f;
    if (x >= 2) v += hog_selected(cx, x - 2, c, xr[x - 2]);
    if (x <= W - 3) v -= hog_selected(cx, x, c, xr[x]);
    if (x >= 1 && x <= W - 2) {
        v += hog_selected(ca, x - 1, c, ya[x - 1]);
        v -= hog_selected(cb, x - 1, c, yb[x - 1]);
    }
    return v;
}

int preimage_hog_differences_backward(const float *grad0, const float *grad1, const float *along,
                                      const float *across, float across_k, const float *gx, const float *gy,
                                      const float *magnitude, float tiny, const int32_t *channel, float *out,
                                      int64_t N, int64_t C, int64_t H, int64_t W, int threads) {
    const int64_t Hi = H - 2, Wi = W - 2;
    const struct hog_terms terms = {grad0, grad1, along, across, gx, gy, magnitude, across_k, tiny};
    if (threads < 1) threads = 1;
    int64_t bands = (2 * threads + N - 1) / N; /* of output rows per image */
    if (bands > H) bands = H;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed)
    for (int64_t item = 0; item < N * bands; item++) {
        const int64_t n = item / bands, band = item % bands, y0 = H * band / bands, y1 = H * (band + 1) / bands;
        /* the gradients of g on interior rows r % 3 (a ring: rows y - 2 .. y), a zero row, the
         * channels of a missing row */
        float *rows = malloc((size_t)(7 * W) * sizeof(float));
        int32_t *none = malloc((size_t)W * sizeof(int32_t));
        if (!rows || !none) {
            free(rows);
            free(none);
            failed = 1;
            continue;
        }
        float *zeros = rows + 6 * W;
        for (int64_t x = 0; x < W; x++) {
            zeros[x] = 0.0f;
            none[x] = -1;
        }
        for (int64_t r = y0 - 2 > 0 ? y0 - 2 : 0; r < y0 && r < Hi; r++)
            hog_gradient_row(&terms, (n * Hi + r) * Wi, Wi, rows + (r % 3) * W, rows + (3 + r % 3) * W);
        for (int64_t y = y0; y < y1; y++) {
            if (y < Hi)
                hog_gradient_row(&terms, (n * Hi + y) * Wi, Wi, rows + (y % 3) * W, rows + (3 + y % 3) * W);
            /* gx of interior row y - 1, gy of rows y - 2 (above) and y (below), where they exist */
            const int hx = y >= 1 && y <= H - 2, ha = y >= 2, hb = y <= H - 3;
            const float *xr = hx ? rows + ((y - 1) % 3) * W : zeros, *ya = ha ? rows + (3 + (y - 2) % 3) * W : zeros,
                        *yb = hb ? rows + (3 + y % 3) * W : zeros;
            const int32_t *cx = channel ? (hx ? channel + (n * Hi + y - 1) * Wi : none) : NULL,
                          *ca = channel ? (ha ? channel + (n * Hi + y - 2) * Wi : none) : NULL,
                          *cb = channel ? (hb ? channel + (n * Hi + y) * Wi : none) : NULL;
            for (int64_t c = 0; c < C; c++) {
                float *o = out + ((n * C + c) * H + y) * W;
                for (int64_t x = 0; x < W && x < 2; x++) o[x] = hog_adjoint_sample(xr, ya, yb, cx, ca, cb, c, x, W);
                if (channel) /* the middle: every neighbour exists (a missing row is zeros) */
                    for (int64_t x = 2; x < W - 2; x++) {
                        const float a = cx[x - 2] == c ? xr[x - 2] : 0.0f, b = cx[x] == c ? xr[x] : 0.0f;
                        const float u = ca[x - 1] == c ? ya[x - 1] : 0.0f, d = cb[x - 1] == c ? yb[x - 1] : 0.0f;
                        o[x] = ((a - b) + u) - d;
                    }
                else
                    for (int64_t x = 2; x < W - 2; x++) o[x] = ((xr[x - 2] - xr[x]) + ya[x - 1]) - yb[x - 1];
                for (int64_t x = W - 2 > 2 ? W - 2 : 2; x < W; x++)
                    o[x] = hog_adjoint_sample(xr, ya, yb, cx, ca, cb, c, x, W);
            }
        }
        free(rows);
        free(none);
    }
    return failed ? -1 : 0;
}

/* HOG's spatial pooling (representations/hog.py, _pool) and its transpose (_pool_backward).
 *
 * Each interior pixel (i, x) of an image, (H', W') = (H - 2, W - 2), adds value_t * corner[2v + h]
 * to slot slot_t of the cell (top[i] + v, left[x] + h), v, h in {0, 1}, for its T = 1 or 2 terms t,
 * where corner (4, H', W') holds VLFeat's products wy * wx and top / left (-1 .. Hc - 1) the cells
 * up-left of the pixels; contributions to cells outside the Hc x Wc grid are dropped.  cells is
 * (N, Hc, Wc, T S), slot s of term t at t S + s.  A work item is one cell row of one image: it
 * reads the pixel rows whose upper or lower cell it is, and sums into HOG_COPIES copies of a padded
 * row (pixel x into copy x % HOG_COPIES: neighbours, which often share a cell and a slot, do not
 * wait on each other's additions), added up at the end.  Items write disjoint rows: no races, and
 * the result does not depend on the number of threads. */
#define HOG_COPIES 4

int preimage_hog_pool(const int32_t *slot0, const float *value0, const int32_t *slot1, const float *value1,
                      const int32_t *top, const int32_t *left, const float *corner, float *cells, int64_t N,
                      int64_t Hi, int64_t Wi, int64_t Hc, int64_t Wc, int64_t S, int threads) {
    const int64_t T = slot1 ? 2 : 1, stride = T * S, row = (Wc + 2) * stride, plane = Hi * Wi;
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *acc = (float *)malloc((size_t)(HOG_COPIES * row) * sizeof(float));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t q = 0; q < N * Hc; q++) {
                const int64_t n = q / Hc, cy = q % Hc;
                memset(acc, 0, (size_t)(HOG_COPIES * row) * sizeof(float));
                for (int64_t i = 0; i < Hi; i++) {
                    const int64_t v = cy - top[i];
                    if (v != 0 && v != 1) continue;
                    const float *w0 = corner + (2 * v) * plane + i * Wi, *w1 = w0 + plane;
                    const int64_t p = (n * Hi + i) * Wi;
                    for (int64_t t = 0; t < T; t++) {
                        const int32_t *sl = (t ? slot1 : slot0) + p;
                        const float *va = (t ? value1 : value0) + p;
                        for (int64_t x = 0; x < Wi; x++) {
                            float *a = acc + (x % HOG_COPIES) * row + (left[x] + 1) * stride + t * S + sl[x];
                            a[0] += w0[x] * va[x];
                            a[stride] += w1[x] * va[x];
                        }
                    }
                }
                float *out = cells + q * Wc * stride;
                for (int64_t k = 0; k < Wc * stride; k++) {
                    float s = 0.0f;
                    for (int c = 0; c < HOG_COPIES; c++) s += acc[c * row + stride + k];
                    out[k] = s;
                }
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

/* The gradient of each term's value: grad_t[n, i, x] = sum over v, h of corner[2v + h][i, x] *
 * padded[n, top[i] + 1 + v, left[x] + 1 + h, t S + slot_t[n, i, x]], padded (N, Hc + 2, Wc + 2, T S)
 * the cells' gradients with a ring of zeros.  Threads share pixel rows. */
int preimage_hog_pool_backward(const float *padded, const int32_t *slot0, const int32_t *slot1, const int32_t *top,
                               const int32_t *left, const float *corner, float *grad0, float *grad1, int64_t N,
                               int64_t Hi, int64_t Wi, int64_t Hc, int64_t Wc, int64_t S, int threads) {
    const int64_t T = slot1 ? 2 : 1, stride = T * S, row = (Wc + 2) * stride, plane = Hi * Wi;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < N * Hi; q++) {
        const int64_t n = q / Hi, i = q % Hi, p = q * Wi;
        const float *c00 = corner + i * Wi, *c01 = c00 + plane, *c10 = c01 + plane, *c11 = c10 + plane;
        for (int64_t t = 0; t < T; t++) {
            const int32_t *sl = (t ? slot1 : slot0) + p;
            float *g = (t ? grad1 : grad0) + p;
            const float *up = padded + (n * (Hc + 2) + top[i] + 1) * row + t * S, *down = up + row;
#pragma omp simd
            for (int64_t x = 0; x < Wi; x++) {
                const int64_t o = (left[x] + 1) * stride + sl[x];
                g[x] = c00[x] * up[o] + c01[x] * up[o + stride] + c10[x] * down[o] + c11[x] * down[o + stride];
            }
        }
    }
    return 0;
}

/* HOG's orientation assignment (representations/hog.py, _orientations): libvl's scan on every
 * pixel, in its float arithmetic.  score_k = sin_k * gy + cos_k * gx (two rounded products and a
 * rounded sum: no contraction, -std=c11) for the K undirected bins, table (K, 2) = (cos_k, sin_k);
 * the best bin k0 is the first maximum of |score_k| (a strict > scan), directed k0 + K when its
 * score is negative; HOGb's second bin is the first maximum of the others, found in the same pass
 * (a new best demotes the old one to second).  Outputs per pixel (M pixels): slot, the orientation
 * slot (b0 + K) mod 2K + 1 of the best directed bin b0; magnitude = sqrtf(g2) (correctly rounded);
 * and for HOGb (lower != NULL, K > 1) side = +1 / -1, the side of b0's centre where the second
 * bin lies (0 for a null gradient, as hog.py's atan2 path), lower = slot - 1 where side < 0 else
 * slot, along = side * w1 with libvl's weight w1 = acosf(min(|score_k0| / max(|g|, 1e-10f), 1)) *
 * (K / pi) (hog_acos), and term = |g| * along.  Pixels are done HOG_LANES at a time, the loop over
 * them inside the loop over bins, so that it vectorizes. */
#define HOG_LANES 64

/* acos(x) for 0 <= x <= 1 in double, rounded once to float: within an ulp of acosf, and
 * vectorizable (glibc's acosf is not, and torch's acos_ on the CPU differs by an ulp on the first
 * call of a process).  The usual reduction: acos x = pi/2 - asin x for x <= 1/2, else
 * 2 asin sqrt((1 - x) / 2), with asin t = t + t r(t^2) and r a rational minimax approximation of
 * (asin t - t) / t on t^2 <= 1/4 (relative error below 1e-16). */
static inline float hog_acos(float value) {
    const double x = value, pi_2 = 1.57079632679489661923;
    const int upper = x > 0.5;
    const double z = upper ? (1.0 - x) * 0.5 : x * x, root = sqrt(z), t = upper ? root : x;
    const double p = z * (1.66666666666666657415e-01 +
                          z * (-3.25565818622400915405e-01 +
                               z * (2.01212532134862925881e-01 +
                                    z * (-4.00555345006794114027e-02 +
                                         z * (7.91534994289814532176e-04 + z * 3.47933107596021167570e-05)))));
    const double q = 1.0 + z * (-2.40339491173441421878e+00 +
                                z * (2.02094576023350569471e+00 +
                                     z * (-6.88283971605453293030e-01 + z * 7.70381505559019352791e-02)));
    const double asin_t = t + t * (p / q);
    return (float)(upper ? 2.0 * asin_t : pi_2 - asin_t);
}

int preimage_hog_orientations(const float *gx, const float *gy, const float *g2, const float *table, int64_t M,
                              int64_t K, int32_t *slot, float *magnitude, int32_t *lower, float *term, float *along,
                              int threads) {
    const int64_t blocks = (M + HOG_LANES - 1) / HOG_LANES;
    const int bilinear = lower != NULL;
    const int32_t k = (int32_t)K;
    const float k_pi = (float)((double)K / 3.14159265358979323846);
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t p0 = b * HOG_LANES, len = M - p0 < HOG_LANES ? M - p0 : HOG_LANES;
        const float *x = gx + p0, *y = gy + p0;
        float s1[HOG_LANES], a1[HOG_LANES], s2[HOG_LANES], a2[HOG_LANES];
        int32_t k1[HOG_LANES], k2[HOG_LANES];
        {
            const float c = table[0], s = table[1];
#pragma omp simd
            for (int64_t p = 0; p < len; p++) {
                const float score = s * y[p] + c * x[p];
                s1[p] = score;
                a1[p] = fabsf(score);
                k1[p] = 0;
                s2[p] = 0.0f;
                a2[p] = -1.0f;
                k2[p] = 0;
            }
        }
        for (int32_t j = 1; j < k; j++) {
            const float c = table[2 * j], s = table[2 * j + 1];
            if (bilinear) {
#pragma omp simd
                for (int64_t p = 0; p < len; p++) {
                    const float score = s * y[p] + c * x[p], a = fabsf(score);
                    const int better = a > a1[p], second = a > a2[p];
                    s2[p] = better ? s1[p] : second ? score : s2[p];
                    k2[p] = better ? k1[p] : second ? j : k2[p];
                    a2[p] = better ? a1[p] : second ? a : a2[p];
                    s1[p] = better ? score : s1[p];
                    k1[p] = better ? j : k1[p];
                    a1[p] = better ? a : a1[p];
                }
            } else {
#pragma omp simd
                for (int64_t p = 0; p < len; p++) {
                    const float score = s * y[p] + c * x[p], a = fabsf(score);
                    const int better = a > a1[p];
                    s1[p] = better ? score : s1[p];
                    k1[p] = better ? j : k1[p];
                    a1[p] = better ? a : a1[p];
                }
            }
        }
        int32_t *sl = slot + p0;
        float *m = magnitude + p0;
        const float *q = g2 + p0;
#pragma omp simd
        for (int64_t p = 0; p < len; p++) {
            const int32_t b0 = k1[p] + (s1[p] < 0.0f ? k : 0);
            k1[p] = b0; /* from here on the best directed bin */
            sl[p] = (b0 < k ? b0 + k : b0 - k) + 1;
            m[p] = sqrtf(q[p]);
        }
        if (bilinear) {
            int32_t *lo = lower + p0;
            float *e = term + p0, *a = along + p0;
#pragma omp simd
            for (int64_t p = 0; p < len; p++) {  /* side (in s2) and the cosine (in a2) */
                const int32_t b0 = k1[p], b1 = k2[p] + (s2[p] < 0.0f ? k : 0);
                const int32_t d = b1 - b0 < 0 ? b1 - b0 + 2 * k : b1 - b0;
                const float dir = (x[p] == 0.0f) & (y[p] == 0.0f) ? 0.0f : d == 1 ? 1.0f : -1.0f;
                const float denominator = m[p] > 1e-10f ? m[p] : 1e-10f, cosine = a1[p] / denominator;
                lo[p] = sl[p] - (dir < 0.0f ? 1 : 0);
                s2[p] = dir;
                a2[p] = cosine < 1.0f ? cosine : 1.0f;
            }
#pragma omp simd
            for (int64_t p = 0; p < len; p++) {
                const float signed_weight = hog_acos(a2[p]) * k_pi * s2[p];
                a[p] = signed_weight;
                e[p] = m[p] * signed_weight;
            }
        }
    }
    return 0;
}

/* HOG's UoCTTI block normalization (representations/hog.py, _normalize) and its transpose
 * (_normalize_backward), the PyTorch code's float operations in its order.
 *
 * hist: N directed histograms (2K, Hc, Wc), image n at hist + n * hist_stride.  u = h_k + h_{k+K}
 * (undirected), norm = sum_k u_k^2 per cell; block (i, j), 0 <= i <= Hc, 0 <= j <= Wc, covers the
 * cells i - 1 .. i, j - 1 .. j (clamped: replicate padding) and has factor 1 / sqrtf(sum of their
 * norms + 1e-4).  Cell (y, x) is in blocks f0 = (y, x), f1 = (y, x + 1), f2 = (y + 1, x),
 * f3 = (y + 1, x + 1); with s = (h, u) its 3K stacked values, code (N, 3K + 4, Hc, Wc) is
 * 0.5 sum_b min(f_b s_c, 0.2) for c < 3K and, for the four blocks b, TEXTURE sum_k min(f_b u_k, 0.2).
 * The backward pass recomputes all of it from hist and maps the code's gradient to hist's
 * (N, 2K, Hc, Wc); the clamp passes the gradient up to and including 0.2.  Images are the work
 * items, each with its own scratch. */
static void hog_factors(const float *h, int64_t K, int64_t Hc, int64_t Wc, float *u, float *norm, float *factor) {
    const int64_t HW = Hc * Wc;
    for (int64_t k = 0; k < K; k++)
        for (int64_t c = 0; c < HW; c++) u[k * HW + c] = h[k * HW + c] + h[(k + K) * HW + c];
    for (int64_t c = 0; c < HW; c++) norm[c] = 0.0f;
    for (int64_t k = 0; k < K; k++)
        for (int64_t c = 0; c < HW; c++) norm[c] += u[k * HW + c] * u[k * HW + c];
    for (int64_t i = 0; i <= Hc; i++) {
        const int64_t top = (i > 0 ? i - 1 : 0) * Wc, bottom = (i < Hc ? i : Hc - 1) * Wc;
        for (int64_t j = 0; j <= Wc; j++) {
            const int64_t left = j > 0 ? j - 1 : 0, right = j < Wc ? j : Wc - 1;
            const float block = norm[top + left] + norm[top + right] + norm[bottom + left] + norm[bottom + right];
            factor[i * (Wc + 1) + j] = 1.0f / sqrtf(block + 1e-4f);
        }
    }
}

static inline float hog_clamp(float v) { return v > 0.2f ? 0.2f : v; }

int preimage_hog_normalize(const float *hist, int64_t hist_stride, float *code, int64_t N, int64_t K, int64_t Hc,
                           int64_t Wc, float texture, int threads) {
    const int64_t HW = Hc * Wc, F = (Hc + 1) * (Wc + 1);
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *u = (float *)malloc((size_t)(K * HW + HW + F) * sizeof(float));
        if (!u) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *norm = u + K * HW, *factor = norm + HW;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const float *h = hist + n * hist_stride;
                float *out = code + n * (3 * K + 4) * HW;
                hog_factors(h, K, Hc, Wc, u, norm, factor);
                for (int64_t y = 0; y < Hc; y++)
                    for (int64_t x = 0; x < Wc; x++) {
                        const int64_t cell = y * Wc + x, f = y * (Wc + 1) + x;
                        const float f0 = factor[f], f1 = factor[f + 1], f2 = factor[f + Wc + 1], f3 = factor[f + Wc + 2];
                        float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
                        for (int64_t c = 0; c < 3 * K; c++) {
                            const float v = c < 2 * K ? h[c * HW + cell] : u[(c - 2 * K) * HW + cell];
                            const float n0 = hog_clamp(f0 * v), n1 = hog_clamp(f1 * v), n2 = hog_clamp(f2 * v),
                                        n3 = hog_clamp(f3 * v);
                            out[c * HW + cell] = (((0.0f + n0) + n1) + n2 + n3) * 0.5f;
                            if (c >= 2 * K) {
                                t0 += n0;
                                t1 += n1;
                                t2 += n2;
                                t3 += n3;
                            }
                        }
                        out[(3 * K) * HW + cell] = t0 * texture;
                        out[(3 * K + 1) * HW + cell] = t1 * texture;
                        out[(3 * K + 2) * HW + cell] = t2 * texture;
                        out[(3 * K + 3) * HW + cell] = t3 * texture;
                    }
            }
        }
        free(u);
    }
    return failed ? -1 : 0;
}

int preimage_hog_normalize_backward(const float *hist, int64_t hist_stride, const float *grad, float *grad_hist,
                                    int64_t N, int64_t K, int64_t Hc, int64_t Wc, float texture, int threads) {
    const int64_t HW = Hc * Wc, F = (Hc + 1) * (Wc + 1);
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *u = (float *)malloc((size_t)(K * HW + 2 * HW + 2 * F + K * HW) * sizeof(float));
        if (!u) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *norm = u + K * HW, *factor = norm + HW, *grad_factor = factor + F, *grad_norm = grad_factor + F,
                  *grad_u = grad_norm + HW;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const float *h = hist + n * hist_stride, *g = grad + n * (3 * K + 4) * HW;
                float *gh = grad_hist + n * 2 * K * HW;
                hog_factors(h, K, Hc, Wc, u, norm, factor);
                for (int64_t f = 0; f < F; f++) grad_factor[f] = 0.0f;
                for (int64_t y = 0; y < Hc; y++)
                    for (int64_t x = 0; x < Wc; x++) {
                        const int64_t cell = y * Wc + x, f = y * (Wc + 1) + x;
                        const float fb[4] = {factor[f], factor[f + 1], factor[f + Wc + 1], factor[f + Wc + 2]};
                        float gt[4], gf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        for (int b = 0; b < 4; b++) gt[b] = g[(3 * K + b) * HW + cell] * texture;
                        for (int64_t c = 0; c < 3 * K; c++) {
                            const float v = c < 2 * K ? h[c * HW + cell] : u[(c - 2 * K) * HW + cell];
                            const float half = g[c * HW + cell] * 0.5f;
                            float gs = 0.0f;
                            for (int b = 0; b < 4; b++) {
                                const float pass = fb[b] * v <= 0.2f ? 1.0f : 0.0f;
                                float gp = pass * half;
                                if (c >= 2 * K) gp += pass * gt[b];
                                gf[b] += gp * v;
                                gs += gp * fb[b];
                            }
                            if (c < 2 * K) gh[c * HW + cell] = gs;
                            else grad_u[(c - 2 * K) * HW + cell] = gs;
                        }
                        grad_factor[f] += gf[0];
                        grad_factor[f + 1] += gf[1];
                        grad_factor[f + Wc + 1] += gf[2];
                        grad_factor[f + Wc + 2] += gf[3];
                    }
                for (int64_t c = 0; c < HW; c++) grad_norm[c] = 0.0f;
                for (int64_t i = 0; i <= Hc; i++) {
                    const int64_t top = (i > 0 ? i - 1 : 0) * Wc, bottom = (i < Hc ? i : Hc - 1) * Wc;
                    for (int64_t j = 0; j <= Wc; j++) {
                        const int64_t left = j > 0 ? j - 1 : 0, right = j < Wc ? j : Wc - 1, f = i * (Wc + 1) + j;
                        const float fc = factor[f], gb = grad_factor[f] * (fc * fc * fc) * -0.5f;
                        grad_norm[top + left] += gb;
                        grad_norm[top + right] += gb;
                        grad_norm[bottom + left] += gb;
                        grad_norm[bottom + right] += gb;
                    }
                }
                for (int64_t k = 0; k < K; k++)
                    for (int64_t c = 0; c < HW; c++) {
                        const float gu = grad_u[k * HW + c] + 2.0f * (u[k * HW + c] * grad_norm[c]);
                        gh[k * HW + c] += gu;
                        gh[(k + K) * HW + c] += gu;
                    }
            }
        }
        free(u);
    }
    return failed ? -1 : 0;
}

/* DSIFT's orientation maps (representations/dsift.py, _orientations and the scatter of
 * _histograms, plain arithmetic) and their transpose.
 *
 * pix is the (H, W, N) pixel-major image; maps (R, Cm, N, 8) cover image rows first_r .. first_r + R - 1
 * and columns first_c .. first_c + Cm - 1 (positions outside the image are left alone: the caller
 * pads them by continuity).  Each pixel's gradient (central differences inside, one-sided on the
 * borders) gets VLFeat's fast atan2 angle, split linearly between the two nearest of 8 bins, and
 * its modulus: bin0 receives (1 - frac) mod, bin0 + 1 (mod 8) frac mod, the other six 0.  The
 * operations are those of the PyTorch code, in its order (no contraction: -std=c11).  The backward
 * pass recomputes the pixel's arithmetic from pix and maps the maps' gradient G (same layout) to
 * the gradients of gx and gy, (H, W, N) each, zero for pixels outside the maps.  Threads share rows. */
struct dsift_pixel {
    float gx, gy, ax, ay, den, ratio, sx, sy, frac, mod, inv;
    int bin0;
};

/* the differences' taps at (y, x): offsets of the samples after and before it, and the factor
 * (0.5 inside, 1 for the one-sided differences on the borders) */
struct dsift_taps {
    int64_t xa, xb, ya, yb;
    float fx, fy;
};

static inline struct dsift_taps dsift_taps(int64_t y, int64_t x, int64_t H, int64_t W, int64_t N) {
    struct dsift_taps t;
    t.xa = x == W - 1 ? 0 : N;
    t.xb = x == 0 ? 0 : -N;
    t.fx = x == 0 || x == W - 1 ? 1.0f : 0.5f;
    t.ya = y == H - 1 ? 0 : W * N;
    t.yb = y == 0 ? 0 : -W * N;
    t.fy = y == 0 || y == H - 1 ? 1.0f : 0.5f;
    return t;
}

/* the constants of the arithmetic, from k = (eps, c3, c1, pi/4, pi/2, 2 pi, tiny), held in registers
 * (a constant read from memory under a condition stops the vectorizer); numBinT / (2 pi) is a double */
struct dsift_constants {
    float eps, c3, c1, pi_4, pi_2, two_pi, tiny;
};

static inline struct dsift_constants dsift_constants(const float *k) {
    const struct dsift_constants K = {k[0], k[1], k[2], k[3], k[4], k[5], k[6]};
    return K;
}

static inline struct dsift_pixel dsift_pixel(const float *c, const struct dsift_taps *t, struct dsift_constants k) {
    /* c: the pixel */
    struct dsift_pixel p;
    p.gx = (c[t->xa] - c[t->xb]) * t->fx;
    p.gy = (c[t->ya] - c[t->yb]) * t->fy;
    p.ax = fabsf(p.gx);
    p.ay = fabsf(p.gy) + k.eps;
    p.den = p.ax + p.ay;
    p.ratio = (p.ax - p.ay) / p.den;
    p.sx = p.gx >= 0.0f ? 1.0f : -1.0f;
    p.sy = p.gy >= 0.0f ? 1.0f : -1.0f;
    float angle = p.ratio * k.c3;
    angle = angle * p.ratio;
    angle = angle - k.c1;
    angle = angle * p.ratio;
    angle = angle * p.sx;
    const float base = p.sx * -k.pi_4 + k.pi_2;
    angle = (angle + base) * p.sy;
    angle = angle + (angle < 0.0f ? k.two_pi : 0.0f);
    const float nt = (float)((double)angle * (8.0 / (2.0 * 3.14159265358979323846)));
    const int bin = (int)nt; /* floor: nt >= 0 (a truncation, which vectorizes where floorf does not) */
    p.frac = nt - (float)bin;
    p.bin0 = bin & 7;
    const float sq = p.gx * p.gx + p.gy * p.gy;
    const float safe = sq > k.tiny ? sq : k.tiny;
    p.inv = sq >= k.tiny ? 1.0f / sqrtf(safe) : 0.0f;
    p.mod = sq * p.inv;
    return p;
}

#define DSIFT_LANES 16 /* images computed together (the loop over them vectorizes) */

/* the maps of `lanes` <= DSIFT_LANES neighbouring images at one pixel: c the first image's sample
 * (pixel-major, the images innermost), o its 8 orientations, then the next image's */
static inline void dsift_maps_block(const float *c, const struct dsift_taps *taps, int lanes,
                                    struct dsift_constants k, float *o) {
    float w0[DSIFT_LANES], w1[DSIFT_LANES];
    int b0[DSIFT_LANES];
#pragma omp simd
    for (int j = 0; j < lanes; j++) {
        const struct dsift_pixel p = dsift_pixel(c + j, taps, k);
        b0[j] = p.bin0;
        w0[j] = (-p.frac + 1.0f) * p.mod;
        w1[j] = p.frac * p.mod;
    }
    for (int j = 0; j < lanes * 8; j++) o[j] = 0.0f;
    for (int j = 0; j < lanes; j++) {
        o[j * 8 + b0[j]] = w0[j];
        o[j * 8 + ((b0[j] + 1) & 7)] = w1[j];
    }
}

/* its transpose: the maps' gradient g (same layout as o) -> the gradients of the finite
 * differences gx, gy at the pixel (one per image, contiguous) */
static inline void dsift_maps_block_backward(const float *c, const float *g, const struct dsift_taps *taps,
                                             int lanes, struct dsift_constants k, float *dgx, float *dgy) {
    const float c3x3 = k.c3 * 3.0f, scale2 = (float)(2.0 * (8.0 / (2.0 * 3.14159265358979323846)));
#pragma omp simd
    for (int j = 0; j < lanes; j++) {
        const struct dsift_pixel p = dsift_pixel(c + j, taps, k);
        const float g0 = g[j * 8 + p.bin0], g1 = g[j * 8 + ((p.bin0 + 1) & 7)];
        const float dg = g1 - g0;
        float dmod = g0 + p.frac * dg;
        float cc = p.ratio * p.ratio;
        cc = cc * c3x3 - k.c1;
        cc = cc * (dg * p.mod);
        cc = cc * scale2;
        cc = cc / p.den;
        cc = cc / p.den;
        const float gx = cc * p.ay * p.sy;
        const float gy = -(cc * p.ax * p.sx);
        dmod = dmod * p.inv;
        dgx[j] = gx + dmod * p.gx;
        dgy[j] = gy + dmod * p.gy;
    }
}

int preimage_dsift_maps(const float *pix, float *maps, int64_t N, int64_t H, int64_t W, int64_t first_r, int64_t R,
                        int64_t first_c, int64_t Cm, const float *constants, int threads) {
    const struct dsift_constants k = dsift_constants(constants);
    if (threads < 1) threads = 1;
    const int64_t y0 = first_r > 0 ? first_r : 0, y1 = first_r + R < H ? first_r + R : H;
    const int64_t x0 = first_c > 0 ? first_c : 0, x1 = first_c + Cm < W ? first_c + Cm : W;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t y = y0; y < y1; y++) {
        for (int64_t x = x0; x < x1; x++) {
            float *out = maps + (((y - first_r) * Cm + (x - first_c)) * N) * 8;
            const struct dsift_taps taps = dsift_taps(y, x, H, W, N);
            for (int64_t n0 = 0; n0 < N; n0 += DSIFT_LANES) {
                const int lanes = N - n0 < DSIFT_LANES ? (int)(N - n0) : DSIFT_LANES;
                dsift_maps_block(pix + (y * W + x) * N + n0, &taps, lanes, k, out + n0 * 8);
            }
        }
    }
    return 0;
}

int preimage_dsift_maps_backward(const float *pix, const float *G, float *dgx, float *dgy, int64_t N, int64_t H,
                                 int64_t W, int64_t first_r, int64_t R, int64_t first_c, int64_t Cm, const float *constants,
                                 int threads) {
    const struct dsift_constants k = dsift_constants(constants);
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t y = 0; y < H; y++) {
        for (int64_t x = 0; x < W; x++) {
            const int64_t r = y - first_r, cm = x - first_c, q = (y * W + x) * N;
            if (r < 0 || r >= R || cm < 0 || cm >= Cm) {
                for (int64_t n = 0; n < N; n++) dgx[q + n] = dgy[q + n] = 0.0f;
                continue;
            }
            const float *g = G + ((r * Cm + cm) * N) * 8;
            const struct dsift_taps taps = dsift_taps(y, x, H, W, N);
            for (int64_t n0 = 0; n0 < N; n0 += DSIFT_LANES) {
                const int lanes = N - n0 < DSIFT_LANES ? (int)(N - n0) : DSIFT_LANES;
                dsift_maps_block_backward(pix + q + n0, g + n0 * 8, &taps, lanes, k, dgx + q + n0, dgy + q + n0);
            }
        }
    }
    return 0;
}

/* DSIFT's banded spatial binning (representations/dsift.py: _histograms and _histograms_backward
 * when every bin centre lies on a grid of spacing s, plain arithmetic) fused with the orientation
 * maps, and its transpose fused with the maps' transpose and the finite differences' adjoint.
 *
 * Along the rows (dsift._Axis) the maps span the virtual rows v = 0 .. (Jr + 1) s - 1, image row
 * clamp(first_r + v, 0, H - 1) (padding by continuity), and row output (j, b), centre j < Jr and
 * bin b < 4, is sum_q kr[b][q] maps[j s + q], q < 2s; the columns likewise (first_c, Jc, kc).  Bin b
 * of frame k is centre b + ratio k.  pix is the (H, W, N) pixel-major image; hist (F, N, 128):
 * frame ky nfx + kx, image, dimension t + 8 bx + 32 by.  The maps are never stored: a worker owns
 * up to POOL_IMAGES images (their 8 orientations each: the lanes, vectorized) and a band of centres,
 * computes the maps rows it needs into a ring of 2s rows and bins them, 4 bins at once per column,
 * then bins the 4 row outputs along the columns.  The backward pass first maps hist's gradient
 * through the column binning's transpose (lines L[j][b], one per row output), then, per band of
 * image rows, gathers each maps row's gradient from the (at most 8) lines over it, s rows at a time,
 * and the pixel's derivative (dsift_maps_block_backward) gives the finite differences' gradients,
 * whose adjoint is a last pass over the image. */
#define POOL_IMAGES 8

struct dsift_grid {
    int64_t N, H, W, first_r, Jr, first_c, Jc, s, ratio, nfy, nfx;
    int64_t xs, ncols; /* the image columns the maps read: xs .. xs + ncols - 1 */
};

static inline int64_t clamp_index(int64_t v, int64_t n) { return v < 0 ? 0 : v >= n ? n - 1 : v; }

/* the frame k whose bin b is centre j along an axis, or -1 */
static inline int64_t pool_frame(int64_t j, int64_t b, int64_t ratio, int64_t frames) {
    const int64_t d = j - b;
    return d >= 0 && d % ratio == 0 && d / ratio < frames ? d / ratio : -1;
}

/* image columns: the maps' columns are image columns xs .. xs + ncols - 1 */
static inline int64_t pool_column(const struct dsift_grid *g, int64_t u) {
    return clamp_index(g->first_c + u, g->W) - g->xs;
}

/* the inner columns x0 .. x1 - 1 the maps read (their differences have the same taps), when the
 * chunk holds all the images, so that neighbouring columns' samples are contiguous and a run of
 * columns is computed as one block of lanes (batch 1 would otherwise be computed a sample at a
 * time); x0 = -1 otherwise */
struct pool_interior {
    int64_t x0, x1;
};

static inline struct pool_interior pool_interior(const struct dsift_grid *g, int64_t cn) {
    const int64_t x_end = g->xs + g->ncols;
    struct pool_interior in = {g->xs > 1 ? g->xs : 1, x_end < g->W - 1 ? x_end : g->W - 1};
    if (cn != g->N || in.x0 >= in.x1) in.x0 = in.x1 = -1;
    return in;
}

/* the maps row of image row y for images n0 .. n0 + cn - 1: out[c][image][t] */
static void pool_maps_row(const float *pix, const struct dsift_grid *g, int64_t y, int64_t n0, int64_t cn,
                          struct dsift_constants k, float *out) {
    const int64_t x_end = g->xs + g->ncols;
    struct pool_interior in = pool_interior(g, cn);
    for (int64_t x = g->xs; x < x_end;) {
        const struct dsift_taps taps = dsift_taps(y, x, g->H, g->W, g->N);
        if (x == in.x0) { /* a run of columns with the same taps, DSIFT_LANES samples at a time */
            const int64_t total = (in.x1 - in.x0) * cn;
            for (int64_t e = 0; e < total; e += DSIFT_LANES)
                dsift_maps_block(pix + (y * g->W + x) * g->N + e, &taps, (int)(total - e < DSIFT_LANES ? total - e : DSIFT_LANES),
                                 k, out + ((x - g->xs) * cn + e) * 8);
            x = in.x1;
            continue;
        }
        dsift_maps_block(pix + (y * g->W + x) * g->N + n0, &taps, (int)cn, k, out + (x - g->xs) * cn * 8);
        x++;
    }
}

/* the 4 row outputs of 32 samples e .. e + 31 of a maps row (src[q]: the row of tap q), in
 * registers: GCC's vector extension (portable C; contracted to FMAs here, as an array of
 * accumulators would be kept on the stack) */
typedef float pool_v8 __attribute__((vector_size(32)));
typedef float pool_v8u __attribute__((vector_size(32), aligned(4)));
#define POOL_BLOCK 32

static void __attribute__((noinline, optimize("fp-contract=fast")))
pool_rows4(const float *const *src, const float *kr, int64_t taps, int64_t e, float *lines, int64_t row) {
    pool_v8 a[4][4] = {{{0}}};
    for (int64_t q = 0; q < taps; q++) {
        const pool_v8u *m = (const pool_v8u *)(src[q] + e);
        const pool_v8 m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3];
        for (int b = 0; b < 4; b++) {
            const float k = kr[b * taps + q];
            a[b][0] += k * m0;
            a[b][1] += k * m1;
            a[b][2] += k * m2;
            a[b][3] += k * m3;
        }
    }
    for (int b = 0; b < 4; b++)
        for (int i = 0; i < 4; i++) *(pool_v8u *)(lines + b * row + e + 8 * i) = a[b][i];
}

/* the same for 8 samples */
static void pool_rows4_tail(const float *const *src, const float *kr, int64_t taps, int64_t e, float *lines,
                            int64_t row) {
    float a[4][8] = {{0}};
    for (int64_t q = 0; q < taps; q++)
        for (int b = 0; b < 4; b++)
            for (int l = 0; l < 8; l++) a[b][l] = fmaf(kr[b * taps + q], src[q][e + l], a[b][l]);
    for (int b = 0; b < 4; b++)
        for (int l = 0; l < 8; l++) lines[b * row + e + l] = a[b][l];
}

/* the column binning of a row output's line (lanes per column) at centre jc: o[bx][lanes], the 4
 * bins at once, 8 lanes at a time in registers */
static void __attribute__((noinline, optimize("fp-contract=fast")))
pool_columns4(const float *line, const struct dsift_grid *g, const float *kc, int64_t lanes, int64_t jc, float *o) {
    const int64_t s = g->s, taps = 2 * s;
    for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
        pool_v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t q = 0; q < taps; q++) {
            const pool_v8 m = *(const pool_v8u *)(line + pool_column(g, jc * s + q) * lanes + l0);
            a0 += kc[q] * m;
            a1 += kc[taps + q] * m;
            a2 += kc[2 * taps + q] * m;
            a3 += kc[3 * taps + q] * m;
        }
        *(pool_v8u *)(o + l0) = a0;
        *(pool_v8u *)(o + lanes + l0) = a1;
        *(pool_v8u *)(o + 2 * lanes + l0) = a2;
        *(pool_v8u *)(o + 3 * lanes + l0) = a3;
    }
}

static int pool_forward_item(const float *pix, float *hist, const struct dsift_grid *g, const float *kr,
                             const float *kc, struct dsift_constants k, int64_t n0, int64_t cn, int64_t j0,
                             int64_t j1) {
    const int64_t s = g->s, taps = 2 * s, lanes = cn * 8, row = g->ncols * lanes;
    float *ring = malloc((size_t)((taps + 4) * row) * sizeof(float) + (size_t)taps * sizeof(float *));
    if (!ring) return -1;
    float *lines = ring + taps * row;
    const float **src = (const float **)(lines + 4 * row); /* the ring row of each tap */
    int64_t done = -1; /* the last image row in the ring (slot y % taps) */
    for (int64_t j = j0; j < j1; j++) {
        int any = 0;
        for (int64_t b = 0; b < 4; b++) any |= pool_frame(j, b, g->ratio, g->nfy) >= 0;
        if (!any) continue;
        const int64_t lo = clamp_index(g->first_r + j * s, g->H), hi = clamp_index(g->first_r + j * s + taps - 1, g->H);
        for (int64_t y = lo > done + 1 ? lo : done + 1; y <= hi; y++)
            pool_maps_row(pix, g, y, n0, cn, k, ring + (y % taps) * row);
        if (hi > done) done = hi;
        for (int64_t q = 0; q < taps; q++) src[q] = ring + (clamp_index(g->first_r + j * s + q, g->H) % taps) * row;
        int64_t e = 0; /* the 4 row outputs, POOL_BLOCK samples at a time */
        for (; e + POOL_BLOCK <= row; e += POOL_BLOCK) pool_rows4(src, kr, taps, e, lines, row);
        for (; e < row; e += 8) pool_rows4_tail(src, kr, taps, e, lines, row);
        for (int64_t b = 0; b < 4; b++) {
            const int64_t ky = pool_frame(j, b, g->ratio, g->nfy);
            if (ky < 0) continue;
            for (int64_t jc = 0; jc < g->Jc; jc++) {
                float o[4 * POOL_IMAGES * 8];
                pool_columns4(lines + b * row, g, kc, lanes, jc, o);
                for (int64_t bx = 0; bx < 4; bx++) {
                    const int64_t kx = pool_frame(jc, bx, g->ratio, g->nfx);
                    if (kx < 0) continue;
                    float *dst = hist + ((ky * g->nfx + kx) * g->N + n0) * DSIFT_D + 32 * b + 8 * bx;
                    for (int64_t i = 0; i < cn; i++)
                        for (int64_t t = 0; t < 8; t++) dst[i * DSIFT_D + t] = o[bx * lanes + i * 8 + t];
                }
            }
        }
    }
    free(ring);
    return 0;
}

static struct dsift_grid pool_grid(int64_t N, int64_t H, int64_t W, int64_t first_r, int64_t Jr, int64_t first_c,
                                   int64_t Jc, int64_t s, int64_t ratio, int64_t nfy, int64_t nfx) {
    struct dsift_grid g = {N, H, W, first_r, Jr, first_c, Jc, s, ratio, nfy, nfx, 0, 0};
    g.xs = clamp_index(first_c, W);
    g.ncols = clamp_index(first_c + (Jc + 1) * s - 1, W) - g.xs + 1;
    return g;
}

/* the images split into chunks of at most POOL_IMAGES, as even as possible: chunk i starts at
 * image chunk_start(i) */
static inline int64_t chunk_start(int64_t i, int64_t chunks, int64_t N) { return N * i / chunks; }

int preimage_dsift_pool(const float *pix, float *hist, int64_t N, int64_t H, int64_t W, int64_t first_r, int64_t Jr,
                        int64_t first_c, int64_t Jc, int64_t s, int64_t ratio, int64_t nfy, int64_t nfx, const float *kr,
                        const float *kc, const float *constants, int threads) {
    const struct dsift_constants k = dsift_constants(constants);
    const struct dsift_grid g = pool_grid(N, H, W, first_r, Jr, first_c, Jc, s, ratio, nfy, nfx);
    if (threads < 1) threads = 1;
    const int64_t chunks = (N + POOL_IMAGES - 1) / POOL_IMAGES;
    int64_t bands = (threads + chunks - 1) / chunks;
    if (bands > Jr) bands = Jr;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed)
    for (int64_t item = 0; item < chunks * bands; item++) {
        const int64_t i = item / bands, band = item % bands;
        const int64_t n0 = chunk_start(i, chunks, N), n1 = chunk_start(i + 1, chunks, N);
        failed |= pool_forward_item(pix, hist, &g, kr, kc, k, n0, n1 - n0, Jr * band / bands,
                                    Jr * (band + 1) / bands) != 0;
    }
    return failed ? -1 : 0;
}

/* backward, 1: the lines L[j][b][c][lanes] of chunk i (at L + n0 * 8 * Jr * 4 * ncols): the column
 * binning's transpose of hist's gradient, for the row outputs of centre j that a frame uses; the 4
 * bins of a centre at once, 8 lanes at a time */
static void __attribute__((noinline, optimize("fp-contract=fast")))
pool_lines(const float *ghist, float *L, const struct dsift_grid *g, const float *kc, int64_t n0, int64_t cn,
           int64_t j) {
    const int64_t s = g->s, taps = 2 * s, lanes = cn * 8, row = g->ncols * lanes;
    for (int64_t b = 0; b < 4; b++) {
        const int64_t ky = pool_frame(j, b, g->ratio, g->nfy);
        if (ky < 0) continue;
        float *line = L + (j * 4 + b) * row;
        for (int64_t e = 0; e < row; e++) line[e] = 0.0f;
        for (int64_t jc = 0; jc < g->Jc; jc++) {
            float gv[4][POOL_IMAGES * 8]; /* bin bx's gradient, 0 where no frame uses it */
            int any = 0;
            for (int64_t bx = 0; bx < 4; bx++) {
                const int64_t kx = pool_frame(jc, bx, g->ratio, g->nfx);
                if (kx < 0) {
                    for (int64_t l = 0; l < lanes; l++) gv[bx][l] = 0.0f;
                    continue;
                }
                any = 1;
                const float *src = ghist + ((ky * g->nfx + kx) * g->N + n0) * DSIFT_D + 32 * b + 8 * bx;
                for (int64_t i = 0; i < cn; i++)
                    for (int64_t t = 0; t < 8; t++) gv[bx][i * 8 + t] = src[i * DSIFT_D + t];
            }
            if (!any) continue;
            for (int64_t q = 0; q < taps; q++) {
                float *m = line + pool_column(g, jc * s + q) * lanes;
                const float k0 = kc[q], k1 = kc[taps + q], k2 = kc[2 * taps + q], k3 = kc[3 * taps + q];
                for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
                    pool_v8 v = *(pool_v8u *)(m + l0);
                    v += k0 * *(const pool_v8u *)(gv[0] + l0);
                    v += k1 * *(const pool_v8u *)(gv[1] + l0);
                    v += k2 * *(const pool_v8u *)(gv[2] + l0);
                    v += k3 * *(const pool_v8u *)(gv[3] + l0);
                    *(pool_v8u *)(m + l0) = v;
                }
            }
        }
    }
}

/* backward, 2: the maps' gradient of virtual rows i s .. i s + s - 1 (block i) into G[r][c][lanes]:
 * the lines of centres i (taps r) and i - 1 (taps s + r), 8 of them (fewer at the ends: padded
 * with a line and null taps), 16 samples at a time in registers, all s rows from them */
static void __attribute__((noinline, optimize("fp-contract=fast")))
pool_block(const float *L, float *G, const struct dsift_grid *g, const float *kr, int64_t lanes, int64_t i,
           const float *zeros) {
    const int64_t s = g->s, taps = 2 * s, row = g->ncols * lanes;
    const float *src[8], *tap[8];
    int used = 0;
    for (int64_t j = i; j >= i - 1; j--) {
        if (j < 0 || j >= g->Jr) continue;
        for (int64_t b = 0; b < 4; b++)
            if (pool_frame(j, b, g->ratio, g->nfy) >= 0) {
                src[used] = L + (j * 4 + b) * row;
                tap[used++] = kr + b * taps + (i - j) * s;
            }
    }
    if (!used) {
        for (int64_t e = 0; e < s * row; e++) G[e] = 0.0f;
        return;
    }
    for (int m = used; m < 8; m++) {
        src[m] = src[0];
        tap[m] = zeros;
    }
    int64_t e = 0;
    for (; e + 16 <= row; e += 16) {
        pool_v8 in[8][2];
        for (int m = 0; m < 8; m++) {
            in[m][0] = *(const pool_v8u *)(src[m] + e);
            in[m][1] = *(const pool_v8u *)(src[m] + e + 8);
        }
        for (int64_t r = 0; r < s; r++) {
            pool_v8 a0 = tap[0][r] * in[0][0], a1 = tap[0][r] * in[0][1];
            for (int m = 1; m < 8; m++) {
                a0 += tap[m][r] * in[m][0];
                a1 += tap[m][r] * in[m][1];
            }
            *(pool_v8u *)(G + r * row + e) = a0;
            *(pool_v8u *)(G + r * row + e + 8) = a1;
        }
    }
    for (; e < row; e += 8) {
        pool_v8 in[8];
        for (int m = 0; m < 8; m++) in[m] = *(const pool_v8u *)(src[m] + e);
        for (int64_t r = 0; r < s; r++) {
            pool_v8 a = tap[0][r] * in[0];
            for (int m = 1; m < 8; m++) a += tap[m][r] * in[m];
            *(pool_v8u *)(G + r * row + e) = a;
        }
    }
}

/* backward, 2: image rows y0 .. y1 - 1 of chunk i: the finite differences' gradients dgx, dgy
 * ((H, W, N), this chunk's images) */
static int pool_backward_rows(const float *pix, const float *L, float *dgx, float *dgy, const struct dsift_grid *g,
                              const float *kr, struct dsift_constants k, int64_t n0, int64_t cn, int64_t y0,
                              int64_t y1) {
    const int64_t s = g->s, lanes = cn * 8, row = g->ncols * lanes, V = (g->Jr + 1) * s;
    float *G = malloc((size_t)((s + 1) * row + 2 * s) * sizeof(float));
    if (!G) return -1;
    float *sum = G + s * row, *zeros = sum + row; /* null taps */
    const struct pool_interior in = pool_interior(g, cn);
    for (int64_t e = 0; e < 2 * s; e++) zeros[e] = 0.0f;
    int64_t block = -1;
    for (int64_t y = y0; y < y1; y++) {
        const int64_t v = y - g->first_r;
        const int64_t vlo = y == 0 ? 0 : v, vhi = y == g->H - 1 ? V - 1 : v;
        const int64_t lo = vlo > 0 ? vlo : 0, hi = vhi < V - 1 ? vhi : V - 1;
        const float *grad = NULL; /* the row's maps gradient */
        if (v >= 0 && v < V) { /* then lo <= v <= hi */
            for (int64_t u = lo; u <= hi; u++) {
                if (u / s != block) {
                    block = u / s;
                    pool_block(L, G, g, kr, lanes, block, zeros);
                }
                const float *part = G + (u - block * s) * row;
                if (lo == hi) {
                    grad = part;
                } else {
                    if (u == lo)
                        for (int64_t e = 0; e < row; e++) sum[e] = part[e];
                    else
                        for (int64_t e = 0; e < row; e++) sum[e] += part[e];
                    grad = sum;
                }
            }
        }
        for (int64_t x = 0; x < g->W;) {
            const int64_t q = (y * g->W + x) * g->N + n0, c = x - g->xs;
            if (grad == NULL || c < 0 || c >= g->ncols) {
                for (int64_t i = 0; i < cn; i++) dgx[q + i] = dgy[q + i] = 0.0f;
                x++;
                continue;
            }
            const struct dsift_taps taps = dsift_taps(y, x, g->H, g->W, g->N);
            if (x == in.x0) { /* a run of columns with the same taps (pool_interior) */
                const int64_t total = (in.x1 - in.x0) * cn;
                for (int64_t e = 0; e < total; e += DSIFT_LANES)
                    dsift_maps_block_backward(pix + q + e, grad + c * lanes + e * 8, &taps,
                                              (int)(total - e < DSIFT_LANES ? total - e : DSIFT_LANES), k, dgx + q + e,
                                              dgy + q + e);
                x = in.x1;
                continue;
            }
            dsift_maps_block_backward(pix + q, grad + c * lanes, &taps, (int)cn, k, dgx + q, dgy + q);
            x++;
        }
    }
    free(G);
    return 0;
}

int preimage_dsift_pool_backward(const float *pix, const float *ghist, float *gimage, int64_t N, int64_t H, int64_t W,
                                 int64_t first_r, int64_t Jr, int64_t first_c, int64_t Jc, int64_t s, int64_t ratio,
                                 int64_t nfy, int64_t nfx, const float *kr, const float *kc, const float *constants,
                                 int threads) {
    const struct dsift_constants k = dsift_constants(constants);
    const struct dsift_grid g = pool_grid(N, H, W, first_r, Jr, first_c, Jc, s, ratio, nfy, nfx);
    if (threads < 1) threads = 1;
    const int64_t chunks = (N + POOL_IMAGES - 1) / POOL_IMAGES, per_image = 8 * Jr * 4 * g.ncols;
    int64_t bands = (threads + chunks - 1) / chunks;
    if (bands > H) bands = H;
    float *L = malloc((size_t)(N * per_image + 2 * H * W * N) * sizeof(float));
    if (!L) return -1;
    float *dgx = L + N * per_image, *dgy = dgx + H * W * N;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < chunks * Jr; item++) {
            const int64_t i = item / Jr, j = item % Jr;
            const int64_t n0 = chunk_start(i, chunks, N), n1 = chunk_start(i + 1, chunks, N);
            pool_lines(ghist, L + n0 * per_image, &g, kc, n0, n1 - n0, j);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < chunks * bands; item++) {
            const int64_t i = item / bands, band = item % bands;
            const int64_t n0 = chunk_start(i, chunks, N), n1 = chunk_start(i + 1, chunks, N);
            failed |= pool_backward_rows(pix, L + n0 * per_image, dgx, dgy, &g, kr, k, n0, n1 - n0,
                                         H * band / bands, H * (band + 1) / bands) != 0;
        }
        /* the finite differences' adjoint (dsift._image_gradients_adjoint): row y receives
         * fx dgx of its own pixels at their two taps, fy dgy of rows y - 1 .. y + 1 at theirs */
#pragma omp for schedule(static)
        for (int64_t y = 0; y < H; y++) {
            float *out = gimage + y * W * N;
            for (int64_t e = 0; e < W * N; e++) out[e] = 0.0f;
            /* each sample receives two of these terms, so their order does not change the sum: the
             * inner columns (the same taps) as one run */
            const int64_t inner = W >= 3 ? W - 2 : 0;
            for (int64_t x = 0; x < W; x += x == 0 && inner ? inner + 1 : 1) {
                const struct dsift_taps t = dsift_taps(y, x, H, W, N);
                const float *a = dgx + (y * W + x) * N;
                float *after = out + x * N + t.xa, *before = out + x * N + t.xb;
                for (int64_t n = 0; n < N; n++) after[n] += t.fx * a[n];
                for (int64_t n = 0; n < N; n++) before[n] -= t.fx * a[n];
            }
            if (inner) {
                const struct dsift_taps t = dsift_taps(y, 1, H, W, N);
                const float *a = dgx + (y * W + 1) * N;
                float *after = out + N + t.xa, *before = out + N + t.xb;
                for (int64_t e = 0; e < inner * N; e++) after[e] += t.fx * a[e];
                for (int64_t e = 0; e < inner * N; e++) before[e] -= t.fx * a[e];
            }
            for (int64_t yy = y > 0 ? y - 1 : 0; yy <= y + 1 && yy < H; yy++) {
                const struct dsift_taps t = dsift_taps(yy, 0, H, W, N);
                const int64_t a_row = yy + t.ya / (W * N), b_row = yy + t.yb / (W * N);
                const float *b = dgy + yy * W * N;
                if (a_row == y)
                    for (int64_t e = 0; e < W * N; e++) out[e] += t.fy * b[e];
                if (b_row == y)
                    for (int64_t e = 0; e < W * N; e++) out[e] -= t.fy * b[e];
            }
        }
    }
    free(L);
    return failed ? -1 : 0;
}
