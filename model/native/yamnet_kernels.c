/* Direct CPU kernels for YAMNet's layers: the one-channel stem, depthwise 3x3, and whole separable blocks.
 *
 * Why this file exists: benchmarks/yamnet_speed.py found PyTorch's YAMNet at 0.95x onnxruntime at
 * 32 clips. A per-layer comparison put the gap in the stem (oneDNN ~2x slower than onnxruntime's
 * MLAS kernel), the depthwise layers on small maps (~1.6x slower), oneDNN's GEMM on the small
 * pointwise matrices of the early blocks (76-95 GMAC/s against 107 on big ones) and a fixed ~40 us
 * per oneDNN call. The stem and depthwise layers are 9 multiply-adds per output, where a direct loop
 * beats a general kernel's setup; a separable block feeds each few pixels' depthwise outputs from an
 * L1 buffer straight into a register-tiled pointwise product, so the intermediate map never goes
 * through memory.
 *
 * One entry point, cacara_chain_relu: a list of layers run patch by patch (a single layer is a chain
 * of one). ``threads`` is torch.get_num_threads() of the caller: OpenMP's own setting is per calling
 * thread, so a server thread would otherwise get a different count than the one torch was told.
 *
 * Layout: activations are NHWC (a channels-last torch tensor), weights are tap-major [9][C], and
 * every output gets bias + ReLU fused. Padding follows TensorFlow's 'SAME' rule: taps that fall
 * outside the map are skipped, so no padded copy is made.
 *
 * Each patch is computed by one thread in a fixed order, so results do not depend on the thread
 * count. Threads come from OpenMP; loaded after torch, this library binds to torch's own libgomp
 * (same soname), so it shares torch's thread pool.
 *
 * Built at first use by model/native_kernels.py with the system C compiler; x86-64 builds carry
 * AVX-512 and AVX2+FMA clones picked at run time, so one binary runs on any x86-64 CPU.
 */
#include <stddef.h>
#include <stdlib.h>

/* CACARA_SINGLE_TARGET builds one code path for the compiler's -march (tests build each path this way). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CACARA_SINGLE_TARGET)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));
typedef int vi __attribute__((vector_size(LANES * sizeof(int)), aligned(sizeof(int))));

/* max(a, 0) lane by lane, as a bit mask (C has no vector ?: operator). */
#define RELU(a) ((vf)((vi)(a) & ((a) > (vf){0})))

/* Version of the ABI below: the loader refuses a library that reports another one. */
int cacara_kernels_abi(void) { return 2; }

#define GROUP 8 /* narrow maps: at most this many vectors of channels (128 channels, a 512-byte pixel) */

/* Depthwise outputs of pixels p0 .. p0+rows-1 (row-major over the output map, p0 at row oy, column ox)
 * into buf[rows][c]: pixel by pixel, all channels of a pixel in turn, so the input is read as one
 * sequential stream. Over a whole patch (buf = the output map) this is the kernel for narrow maps. */
static inline __attribute__((always_inline)) void depthwise_rows(
    const float *restrict in, const float *restrict taps, const float *restrict bias, float *restrict buf,
    int oy, int ox, int rows, int h, int w, int c, int stride, int pad_top, int pad_left, int out_w)
{
    for (int r = 0; r < rows; ++r) {
        const int iy0 = oy * stride - pad_top, ix0 = ox * stride - pad_left;
        for (int c0 = 0; c0 < c; c0 += LANES) {
            vf acc = *(const vf *)(bias + c0);
            for (int ky = 0; ky < 3; ++ky) {
                const int iy = iy0 + ky;
                if ((unsigned)iy >= (unsigned)h)
                    continue;
                for (int kx = 0; kx < 3; ++kx) {
                    const int ix = ix0 + kx;
                    if ((unsigned)ix >= (unsigned)w)
                        continue;
                    acc += *(const vf *)(in + ((size_t)iy * w + ix) * c + c0) *
                           *(const vf *)(taps + (size_t)(ky * 3 + kx) * c + c0);
                }
            }
            *(vf *)(buf + (size_t)r * c + c0) = RELU(acc);
        }
        if (++ox == out_w) {
            ox = 0;
            ++oy;
        }
    }
}

/* One patch of a 3x3 convolution computed one 16-output-channel block at a time, its nine taps held in
 * registers. Used for wide depthwise maps (more than GROUP vectors of channels) and, with one_channel
 * set (a constant at every call site, so the branch compiles away), for the stem, where every output
 * channel reads the single input channel. */
static inline __attribute__((always_inline)) void direct3x3_patch(
    const float *restrict in, const float *restrict taps, const float *restrict bias, float *restrict out,
    int h, int w, int c, int stride, int pad_top, int pad_left, int out_h, int out_w, const int one_channel)
{
    const int in_c = one_channel ? 1 : c;
    for (int c0 = 0; c0 < c; c0 += LANES) {
        vf k[9];
        for (int t = 0; t < 9; ++t)
            k[t] = *(const vf *)(taps + (size_t)t * c + c0);
        const vf b = *(const vf *)(bias + c0);
        for (int oy = 0; oy < out_h; ++oy) {
            const int iy0 = oy * stride - pad_top;
            for (int ox = 0; ox < out_w; ++ox) {
                const int ix0 = ox * stride - pad_left;
                vf acc = b;
                for (int ky = 0; ky < 3; ++ky) {
                    const int iy = iy0 + ky;
                    if ((unsigned)iy >= (unsigned)h)
                        continue;
                    const float *row = in + (size_t)iy * w * in_c + (one_channel ? 0 : c0);
                    for (int kx = 0; kx < 3; ++kx) {
                        const int ix = ix0 + kx;
                        if ((unsigned)ix >= (unsigned)w)
                            continue;
                        if (one_channel)
                            acc += row[ix] * k[ky * 3 + kx];
                        else
                            acc += *(const vf *)(row + (size_t)ix * c) * k[ky * 3 + kx];
                    }
                }
                *(vf *)(out + ((size_t)oy * out_w + ox) * c + c0) = RELU(acc);
            }
        }
    }
}

/* ---- separable block: depthwise 3x3 + ReLU, then pointwise 1x1 + ReLU, fused ---------------------------
 *
 * For YAMNet's early blocks (maps 48x32 .. 12x8, 32 .. 256 channels) the pointwise matrix is small, so
 * oneDNN's GEMM runs well below its big-matrix speed (76-95 against 107 GMAC/s measured) and the
 * depthwise output makes a round trip through memory between the two calls. Here the depthwise
 * outputs of MR pixels go into a small buffer that stays in L1, and that buffer is multiplied by the
 * pointwise matrix with an MR x (NV*LANES) register tile.
 */
#define MR 6            /* pixels per register tile */
#define NV 4            /* vectors per register tile: 64 output channels */
#define NB (NV * LANES) /* output channels per packed weight panel */
#define MAX_K 1024      /* widest input the L1 buffer holds: MR x 1024 floats = 24 KB */

/* ReLU(buffer[rows][k] @ panel[k][NB] + bias) -> out rows (row stride ldo). rows == MR unrolls fully. */
static inline __attribute__((always_inline)) void pointwise_tile(
    const float *restrict buf, int k, const float *restrict panel, const float *restrict bias,
    float *restrict out, int ldo, int rows)
{
    vf acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v)
            acc[r][v] = *(const vf *)(bias + v * LANES);
    for (int j = 0; j < k; ++j) {
        const float *bp = panel + (size_t)j * NB;
        vf b[NV];
        for (int v = 0; v < NV; ++v)
            b[v] = *(const vf *)(bp + v * LANES);
        for (int r = 0; r < MR; ++r) {
            if (r >= rows)
                break;
            const float a = buf[(size_t)r * k + j];
            for (int v = 0; v < NV; ++v)
                acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < MR; ++r) {
        if (r >= rows)
            break;
        for (int v = 0; v < NV; ++v)
            *(vf *)(out + (size_t)r * ldo + v * LANES) = RELU(acc[r][v]);
    }
}

/* One patch of a separable block; buf is MR x c floats of scratch. */
static inline __attribute__((always_inline)) void separable_patch(
    const float *restrict in, const float *restrict taps, const float *restrict dw_bias,
    const float *restrict panels, const float *restrict pw_bias, float *restrict out, float *restrict buf,
    int h, int w, int c, int c_out, int stride, int pad_top, int pad_left, int out_h, int out_w)
{
    const int pixels = out_h * out_w;
    for (int p0 = 0, oy = 0, ox = 0; p0 < pixels; p0 += MR) {
        const int rows = pixels - p0 < MR ? pixels - p0 : MR;
        depthwise_rows(in, taps, dw_bias, buf, oy, ox, rows, h, w, c, stride, pad_top, pad_left, out_w);
        ox += rows;
        oy += ox / out_w;
        ox %= out_w;
        for (int n0 = 0; n0 < c_out; n0 += NB)
            pointwise_tile(buf, c, panels + (size_t)n0 * c, pw_bias + n0, out + (size_t)p0 * c_out + n0, c_out,
                           rows);
    }
}

static int separable_shapes_ok(int c, int c_out)
{
    return c >= LANES && c % LANES == 0 && c <= MAX_K && c_out >= NB && c_out % NB == 0;
}

/* ---- a chain of layers, patch by patch ----------------------------------------------------------------
 *
 * Layer by layer, a batch's activations go through memory between calls: 20 patches of YAMNet's
 * 48x32x64 map are 7.8 MB, far more than a core's L2. Run patch by patch instead, a thread carries one
 * patch through every layer of the chain in two scratch maps (at most 393 KB each for YAMNet), so
 * activations stay in its L2 and only the chain's input and output touch memory.
 */
enum { CHAIN_STEM = 0, CHAIN_SEPARABLE = 1, CHAIN_DEPTHWISE = 2 };
#define CHAIN_INTS 3    /* per layer: kind, output channels, stride */
#define CHAIN_WEIGHTS 4 /* per layer: taps, bias, pointwise panels, pointwise bias (NULL where unused) */

static inline int same_before(int size, int stride)
{
    const int out = (size + stride - 1) / stride;
    const int total = (out - 1) * stride + 3 - size;
    return total > 0 ? total / 2 : 0;
}

/* in [n][h][w][c] -> out [n][oh][ow][c_out of the last layer]; 0, -1 on bad sizes, -2 out of memory. */
CLONES int cacara_chain_relu(const float *restrict in, float *restrict out, int n, int h, int w, int c,
                             int layers, const int *restrict spec, const float *const *restrict weights,
                             int threads)
{
    if (n < 0 || h < 1 || w < 1 || c < 1 || layers < 1 || threads < 1)
        return -1;
    size_t scratch = 1; /* floats per scratch map: the largest map between two layers */
    int ch = h, cw = w, cc = c;
    for (int l = 0; l < layers; ++l) {
        const int kind = spec[l * CHAIN_INTS], c_out = spec[l * CHAIN_INTS + 1], stride = spec[l * CHAIN_INTS + 2];
        if (stride < 1 || c_out < LANES || c_out % LANES)
            return -1;
        if (kind == CHAIN_STEM && cc != 1)
            return -1;
        if (kind == CHAIN_SEPARABLE && !separable_shapes_ok(cc, c_out))
            return -1;
        if (kind == CHAIN_DEPTHWISE && c_out != cc)
            return -1;
        if (kind < CHAIN_STEM || kind > CHAIN_DEPTHWISE)
            return -1;
        ch = (ch + stride - 1) / stride;
        cw = (cw + stride - 1) / stride;
        cc = c_out;
        const size_t size = (size_t)ch * cw * cc;
        if (l + 1 < layers && size > scratch)
            scratch = size;
    }
    const size_t in_step = (size_t)h * w * c, out_step = (size_t)ch * cw * cc;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *maps = aligned_alloc(64, ((2 * scratch * sizeof(float) + 63) / 64) * 64);
        float buf[MR * MAX_K] __attribute__((aligned(64)));
        if (!maps)
            failed = 1;
#pragma omp for schedule(static)
        for (int i = 0; i < n; ++i) {
            if (!maps)
                continue;
            const float *src = in + i * in_step;
            int sh = h, sw = w, sc = c;
            for (int l = 0; l < layers; ++l) {
                const int kind = spec[l * CHAIN_INTS], c_out = spec[l * CHAIN_INTS + 1];
                const int stride = spec[l * CHAIN_INTS + 2];
                const float *const *wl = weights + (size_t)l * CHAIN_WEIGHTS;
                const int oh = (sh + stride - 1) / stride, ow = (sw + stride - 1) / stride;
                const int pt = same_before(sh, stride), pl = same_before(sw, stride);
                float *dst = l + 1 == layers ? out + i * out_step : maps + (l % 2) * scratch;
                if (kind == CHAIN_STEM)
                    direct3x3_patch(src, wl[0], wl[1], dst, sh, sw, c_out, stride, pt, pl, oh, ow, 1);
                else if (kind == CHAIN_SEPARABLE)
                    separable_patch(src, wl[0], wl[1], wl[2], wl[3], dst, buf, sh, sw, sc, c_out, stride, pt, pl,
                                    oh, ow);
                else if (sc <= GROUP * LANES)
                    depthwise_rows(src, wl[0], wl[1], dst, 0, 0, oh * ow, sh, sw, sc, stride, pt, pl, ow);
                else
                    direct3x3_patch(src, wl[0], wl[1], dst, sh, sw, sc, stride, pt, pl, oh, ow, 0);
                src = dst;
                sh = oh;
                sw = ow;
                sc = c_out;
            }
        }
        free(maps);
    }
    return failed ? -2 : 0;
}
