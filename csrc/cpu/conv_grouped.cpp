// grad_weight of a grouped convolution whose groups hold a whole number of
// vectors of input channels (ResNeXt's 16 and 32 per group), with a group's
// input channels along the vector lanes. The general kernels take the taps
// or the output channels as a tile's rows and columns: with 16 output
// channels a group, half of a 32-column tile is padding, and each of a
// tile's 12 rows (taps) needs its own pointer. Here each image of a group is
// laid out position by position (input channels fastest, zero-padded) and
// its output gradient likewise, so that
//   dW[o, c, i, j] = sum over (oh, ow) of
//                    gy[oh, ow, o] * xpad[oh * sh + i * dh, ow * sw + j * dw, c]
// is, for a block of OB output channels and TB taps, OB x TB vector sums over
// the positions: per position TB vector loads of the input (one per tap) and
// OB broadcasts of the gradient feed OB * TB multiply-adds. Tasks are whole
// groups, each adding its images in order, so the sums do not depend on the
// thread count.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "conv_kernels.h"
#include "conv_plan.h"
#include "gemm.h"
#include "simd.h"
#include "strided.h"

// The kernels need GCC's vector types and the x86 dispatch (gemm.h).
#if defined(CONVCORE_HAVE_VECTOR_TYPES) && defined(__x86_64__) && \
    (defined(__GNUC__) || defined(__clang__))
#define CONVCORE_GROUPED_LANES 1
#else
#define CONVCORE_GROUPED_LANES 0
#endif

namespace convcore {
namespace conv2d_impl {

namespace {

// Where the kernel applies (grad_weight_grouped_lanes_applies).
constexpr int64_t kGroupedLanesMinGroups = 4, kGroupedLanesFewestChannels = 8,
                  kGroupedLanesMostChannels = 64;

// Output channels per block (broadcasts) and taps per block (vector
// loads): 8 x 3 accumulators with AVX-512's 32 vector registers, 4 x 3 with
// AVX2's 16. kOutPad: what the output channels are padded to.
constexpr int kTapBlock = 3, kOutPad = 8;  // group_image_sums loads 3 taps by name
// Images whose operands are laid out at once, their positions one run of
// sums: at most this many bytes, so they stay in L2 across the passes.
constexpr int64_t kChunkBytes = int64_t(256) << 10;
template <typename V>
constexpr int out_block() {
  return sizeof(V) == 64 ? 8 : 4;
}

// A chunk of images' part of a group's grad_weight, added into
// sums[o][k][c] (Coutp x taps_p x Cg; written when `first`): xt holds the
// padded images (Hp x Wp x Cg each), gt their gradients (P positions of the
// chunk x Coutp, output channels past Coutg zero), pix[q] the origin of
// position q's window in xt, toff[k] tap k's offset inside every window
// (taps past the layer's repeat tap 0; their sums are discarded).
template <typename T, typename V>
CONVCORE_ALWAYS_INLINE void group_image_sums(const T* xt, const T* gt, const int64_t* toff,
                                             const int64_t* pix, int64_t P, int64_t taps_p,
                                             int64_t Coutp, int64_t Cg, bool first, T* sums) {
  constexpr int W = sizeof(V) / sizeof(T), kOutBlock = out_block<V>();
  for (int64_t cv = 0; cv < Cg; cv += W)
    for (int64_t o0 = 0; o0 < Coutp; o0 += kOutBlock)
      for (int64_t k0 = 0; k0 < taps_p; k0 += kTapBlock) {
        V acc[kOutBlock][kTapBlock];
#pragma GCC unroll 8
        for (int o = 0; o < kOutBlock; ++o)
#pragma GCC unroll 3
          for (int t = 0; t < kTapBlock; ++t) acc[o][t] = V{};
        const T* x0 = xt + toff[k0] + cv;
        const T* x1 = xt + toff[k0 + 1] + cv;
        const T* x2 = xt + toff[k0 + 2] + cv;
        const T* g = gt + o0;
        for (int64_t q = 0; q < P; ++q, g += Coutp) {
          const int64_t at = pix[q];
          V xv[kTapBlock];
          __builtin_memcpy(&xv[0], x0 + at, sizeof(V));
          __builtin_memcpy(&xv[1], x1 + at, sizeof(V));
          __builtin_memcpy(&xv[2], x2 + at, sizeof(V));
#pragma GCC unroll 8
          for (int o = 0; o < kOutBlock; ++o) {
            const T go = g[o];
#pragma GCC unroll 3
            for (int t = 0; t < kTapBlock; ++t) acc[o][t] += go * xv[t];
          }
        }
#pragma GCC unroll 8
        for (int o = 0; o < kOutBlock; ++o)
#pragma GCC unroll 3
          for (int t = 0; t < kTapBlock; ++t) {
            T* dst = sums + ((o0 + o) * taps_p + k0 + t) * Cg + cv;
            if (!first) {
              V old;
              __builtin_memcpy(&old, dst, sizeof(V));
              acc[o][t] += old;
            }
            __builtin_memcpy(dst, &acc[o][t], sizeof(V));
          }
      }
}

#if CONVCORE_GROUPED_LANES
template <typename T>
using Vec512 = std::conditional_t<std::is_same_v<T, float>, simd::f32x16, simd::f64x8>;
template <typename T>
using Vec256 = std::conditional_t<std::is_same_v<T, float>, simd::f32x8, simd::f64x4>;

// image_sums: the kernel for T at the ISA level; a group of half an
// AVX-512 vector's channels takes AVX2's vectors.
#define CONVCORE_GROUP_SUMS(T)                                                                   \
  CONVCORE_ISA_DISPATCH3(group_image_sums_##T, (group_image_sums<T, Vec512<T>>),                 \
                         (group_image_sums<T, Vec256<T>>), (group_image_sums<T, Vec256<T>>),     \
                         (const T* xt, const T* gt, const int64_t* toff, const int64_t* pix,     \
                          int64_t P, int64_t taps_p, int64_t Coutp, int64_t Cg, bool first,      \
                          T* sums),                                                              \
                         (xt, gt, toff, pix, P, taps_p, Coutp, Cg, first, sums))                 \
  void image_sums(const T* xt, const T* gt, const int64_t* toff, const int64_t* pix, int64_t P,  \
                  int64_t taps_p, int64_t Coutp, int64_t Cg, bool first, T* sums) {              \
    if (gemm::isa_level() == 2 && Cg % (64 / sizeof(T)) != 0)                                    \
      group_image_sums_##T##_avx2(xt, gt, toff, pix, P, taps_p, Coutp, Cg, first, sums);         \
    else                                                                                         \
      group_image_sums_##T(xt, gt, toff, pix, P, taps_p, Coutp, Cg, first, sums);                \
  }
CONVCORE_GROUP_SUMS(float)
CONVCORE_GROUP_SUMS(double)
#undef CONVCORE_GROUP_SUMS
#endif

}  // namespace

bool grad_weight_grouped_lanes_applies(const ConvGeometry& G, DType dtype) {
#if CONVCORE_GROUPED_LANES
  const int level = gemm::isa_level();
  if (level < 1) return false;
  const int64_t bytes = dtype == DType::Float32 ? 4 : 8;
  const int64_t lanes = (level == 2 && G.Cg % (64 / bytes) == 0 ? 64 : 32) / bytes;
  return G.G >= kGroupedLanesMinGroups && G.Cg % lanes == 0 &&
         G.Cg >= kGroupedLanesFewestChannels && G.Cg <= kGroupedLanesMostChannels &&
         G.Coutg <= kGroupedLanesMostChannels;
#else
  (void)G, (void)dtype;
  return false;
#endif
}

template <typename T>
void grad_weight_grouped_lanes(const T* gy, const TensorView& input, const ConvGeometry& G,
                               T* gw) {
#if CONVCORE_GROUPED_LANES
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t Hp = (G.Ho - 1) * sh + (G.KH - 1) * dh + 1;
  const int64_t Wp = (G.Wo - 1) * sw + (G.KW - 1) * dw + 1;
  const int64_t taps = G.KH * G.KW, taps_p = gemm::round_up(taps, kTapBlock);
  const int64_t Coutp = gemm::round_up(G.Coutg, kOutPad);
  const int64_t frame = Hp * Wp * G.Cg, grad = G.P * Coutp;  // one image's operands
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / int64_t(sizeof(T) * (frame + grad)), 1,
                                            std::max<int64_t>(G.N, 1));
  const int64_t sums_size = Coutp * taps_p * G.Cg;
  std::vector<int64_t> toff(static_cast<size_t>(taps_p), 0);
  for (int64_t k = 0; k < taps; ++k)
    toff[static_cast<size_t>(k)] = ((k / G.KW) * dh * Wp + (k % G.KW) * dw) * G.Cg;
  // a window's origin in the chunk's frames, position by position
  std::vector<int64_t> pix(static_cast<size_t>(chunk * G.P));
  for (int64_t n = 0; n < chunk; ++n)
    for (int64_t q = 0; q < G.P; ++q)
      pix[static_cast<size_t>(n * G.P + q)] =
          n * frame + ((q / G.Wo) * sh * Wp + (q % G.Wo) * sw) * G.Cg;
  const int threads = detail::threads_for(G.G, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, chunk * (frame + grad) + sums_size);
  const T* x = input.ptr<const T>();
  const int64_t w_in = std::max<int64_t>(0, std::min(G.W, Wp - G.p.pad_left));
#pragma omp parallel num_threads(threads)
  {
    T* xt = ws.get(omp_get_thread_num());
    T* gt = xt + chunk * frame;
    T* sums = gt + chunk * grad;
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < G.G; ++g) {
      if (G.N == 0) std::fill(sums, sums + sums_size, T(0));
      for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
        const int64_t nn = std::min(chunk, G.N - n0);
        for (int64_t n = 0; n < nn; ++n) {
          // the padded image, position by position (frame rows and columns
          // past the input, or before it, zero); rows of unit stride go
          // through transpose_copy's register blocks
          T* xn = xt + n * frame;
          std::fill(xn, xn + frame, T(0));
          const T* xg = x + (n0 + n) * G.xs_n + g * G.Cg * G.xs_c;
          for (int64_t ih = 0; ih < G.H && ih + G.p.pad_top < Hp; ++ih) {
            T* dst = xn + ((ih + G.p.pad_top) * Wp + G.p.pad_left) * G.Cg;
            const T* src = xg + ih * G.xs_h;
            if (G.xs_w == 1) {
              gemm::transpose_copy(src, G.xs_c, G.Cg, w_in, dst, G.Cg);
            } else {
              for (int64_t iw = 0; iw < w_in; ++iw)
                for (int64_t c = 0; c < G.Cg; ++c)
                  dst[iw * G.Cg + c] = src[iw * G.xs_w + c * G.xs_c];
            }
          }
          // the gradient, position by position (channels past Coutg zero)
          T* gn = gt + n * grad;
          gemm::transpose_copy(gy + ((n0 + n) * G.Cout + g * G.Coutg) * G.P, G.P, G.Coutg, G.P,
                               gn, Coutp);
          if (Coutp > G.Coutg)
            for (int64_t q = 0; q < G.P; ++q)
              std::fill(gn + q * Coutp + G.Coutg, gn + (q + 1) * Coutp, T(0));
        }
        image_sums(xt, gt, toff.data(), pix.data(), nn * G.P, taps_p, Coutp, G.Cg, n0 == 0,
                   sums);
      }
      // dW[g * Coutg + o, c, k] = sums[o][k][c]
      for (int64_t o = 0; o < G.Coutg; ++o)
        for (int64_t c = 0; c < G.Cg; ++c)
          for (int64_t k = 0; k < taps; ++k)
            gw[((g * G.Coutg + o) * G.Cg + c) * taps + k] = sums[(o * taps_p + k) * G.Cg + c];
    }
  }
#else
  (void)gy, (void)input, (void)G, (void)gw;
  throw std::logic_error("grad_weight_grouped_lanes: no vector types");
#endif
}

template void grad_weight_grouped_lanes<float>(const float*, const TensorView&,
                                               const ConvGeometry&, float*);
template void grad_weight_grouped_lanes<double>(const double*, const TensorView&,
                                                const ConvGeometry&, double*);

}  // namespace conv2d_impl
}  // namespace convcore
