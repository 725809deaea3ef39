// Kernels over the blocked channel layout that the compiled engine keeps
// between layers: an image of C channels is stored as ceil(C / B) planes of
// H x W positions, each position holding B consecutive channels
// ((N, C/B, H, W, B), oneDNN's nChw8c / nChw16c). B is the vector width: 16
// floats with AVX-512, 8 otherwise. Every kernel then works on whole
// vectors of channels: a depthwise or pooling window is B lanes wide at any
// image size, and a convolution writes each output position's channels
// with one store per block.
//
// The channels past C in the last block ("pad lanes") are written by every
// producer with finite values and read by no consumer's result (packed
// weights are zero there), so a buffer reused from the arena never feeds
// stale NaNs into a product.
//
// float32 only; the engine runs float64 nets with the plain-layout ops.
// Kernels are plain functions over pointers; a tensor may be a slice of a
// larger one (a concatenation written in place), so images are addressed
// by an explicit image stride. `threads` is the engine's thread count.
#pragma once
#include <cstdint>
#include <vector>

#include "convcore/shapes.h"

namespace convcore {
namespace blocked {

// Lanes per channel block for the instruction set the kernels run with
// (CONVCORE_ISA caps it as it caps the GEMM).
int block();

// The activation of a kernel's output stage.
enum class Act { None, ReLU, ReLU6, Sigmoid, SiLU, Hardswish, Hardsigmoid };
const char* act_name(Act act);

// A 4-D float tensor in a buffer: image i at data + i * image_stride.
// Blocked: channel block cb, position (h, w), lane l at
// image + (cb * h_size * w_size + h * w_size + w) * B + l. Plain: NCHW.
struct Image {
  float* data = nullptr;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t image_stride = 0;
  bool blocked = true;
};
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Floats of one image: blocked with its channels rounded up to B.
int64_t image_size(int64_t c, int64_t h, int64_t w, bool is_blocked);

// What a producer adds to its result before storing it: bias[channel] (B
// lanes per block, zeros in the pad lanes), then a residual tensor of the
// output's shape and layout, then the activation.
struct Epilogue {
  const float* bias = nullptr;
  const float* residual = nullptr;
  int64_t residual_image_stride = 0;
  Act act = Act::None;
};

// ----------------------------------------------------------------- convolution

// Weights (Cout, Cin / groups, KH, KW) of a convolution packed for the
// direct kernel (gemm::gather_kernel): panels of `width` output channels
// (NR, or fewer blocks for grouped layers whose groups are narrower), each
// over the taps of the input channel blocks its groups read, in the order
// the input's layout stores them (channel block, kernel row, kernel
// column, lane), zero for channels outside a channel's group. The last
// channel block of a layer whose channels are not a multiple of B has taps
// for its real lanes only (LeNet's 6 of 16): padding lanes hold zeros, and
// products with them would be wasted. Grouped convolutions need a blocked
// input.
struct ConvWeights {
  std::vector<float> panels;  // panel u: panel_taps[u] x NR floats at panel_offset[u]
  int64_t cout = 0, cin = 0, kh = 0, kw = 0, groups = 1;
  int64_t taps = 0;   // of the whole input: cin * kh * kw
  int64_t width = 0;  // output channels per panel
  std::vector<int64_t> panel_tap0, panel_taps, panel_offset;  // per panel
  bool blocked_input = true;
  int lanes = 8;  // B when packed
};
ConvWeights pack_conv_weights(const float* weight, int64_t cout, int64_t cin, int64_t kh,
                              int64_t kw, int64_t groups, bool blocked_input);

// A convolution's per-shape plan: the input frame it pads into and the tap
// offsets inside a window of it, fixed for one input size.
struct ConvPlan {
  int64_t hp = 0, wp = 0;     // the frame the output windows read
  bool copy_frame = false;    // false: the input itself is the frame
  bool subsample = false;     // the frame: the positions a strided 1x1 reads
  int64_t chunk = 1;          // images padded at once
  int64_t frame_floats = 0;   // scratch of the frame (chunk images)
  int64_t tile_floats = 0;    // scratch of the tiles, per thread
  std::vector<int64_t> koff;  // tap offsets in a window
};
ConvPlan plan_conv(const ConvWeights& w, const Conv2dParams& p, const Image& in,
                   const Image& out, int threads);
// out = epilogue(conv(in, w)); out blocked, in blocked or plain as packed.
// scratch: plan.frame_floats + threads * plan.tile_floats floats.
void conv2d(const Image& in, const ConvWeights& w, const Conv2dParams& p, const ConvPlan& plan,
            const Epilogue& e, const Image& out, float* scratch, int threads);

// Winograd F(m x m, 3x3), m = 2 or 4, for 3x3 stride-1 undilated groups=1
// convolutions with zero padding, blocked in and out (blocked_winograd.cpp).
struct WinogradWeights {
  int m = 4;
  int64_t cout = 0, cin = 0, cin_pad = 0, panels = 0;
  int lanes = 8;
  std::vector<float> u;  // U = G g G^T: [(m+2)^2 points][panel][cin_pad][NR]
};
WinogradWeights pack_winograd_weights(const float* weight, int64_t cout, int64_t cin, int m);
// Where filter (o, c)'s tap t (row-major 3x3) is: weight[o * out_stride +
// c * in_stride + t * tap_step]; a grad_input reads its weights transposed
// and flipped.
struct FilterAccess {
  int64_t out_stride, in_stride, tap_step;
};
// The same packing into a caller's buffer of winograd_floats(layout) floats
// (layout from winograd_layout; its u stays empty), `threads` panels at once.
WinogradWeights winograd_layout(int64_t cout, int64_t cin, int m);
int64_t winograd_floats(const WinogradWeights& layout);
void pack_winograd(const float* weight, const FilterAccess& f, const WinogradWeights& layout,
                   float* u, int threads);
struct WinogradPlan {
  int64_t tiles_h = 0, tiles_w = 0, band = 0, bands = 0;  // tiles per task, bands per image
  int64_t images = 1;  // images a band holds (more than one: all their tiles, bands = 1)
  int64_t groups = 1;  // tasks per band: groups of output panels
  int64_t v_floats = 0, m_floats = 0;  // scratch per thread: V then M
};
// panel_groups: with few bands, split each band's output panels among
// tasks (the eager op's, whose filters each thread has just transformed).
WinogradPlan plan_winograd(const WinogradWeights& w, const Image& in, const Image& out, int threads,
                           bool panel_groups = false);
// scratch: threads * (plan.v_floats + plan.m_floats) floats.
// u: the packed filters (w.u.data(), or pack_winograd's buffer).
void winograd_conv2d(const Image& in, const WinogradWeights& w, const float* u,
                     const Conv2dParams& p, const WinogradPlan& plan, const Epilogue& e,
                     const Image& out, float* scratch, int threads);

// Winograd for a batch whose tiles all fit one band, the filters read
// raw (as pack_winograd reads them) and transformed inside the tasks: each
// task computes one panel of NR output channels, transforming its filters
// a chunk of input channels at a time into its own L2 and using them there.
// The eager op transforms its filters on every call (the weights
// change between steps), and the whole U (16/9 or 4x the weights: 17 MB for
// 512 x 512 channels, F(2x2)) went out to memory and back. The input
// transform is shared by the tasks.
bool winograd_fused_applies(const WinogradWeights& w, const Image& out);
// scratch floats for threads
int64_t winograd_fused_floats(const WinogradWeights& w, const Image& out, int threads);
void winograd_conv2d_fused(const Image& in, const WinogradWeights& w, const float* weight,
                           const FilterAccess& f, const Conv2dParams& p, const Epilogue& e,
                           const Image& out, float* scratch, int threads);

// Depthwise convolution (one input and one output channel per group),
// blocked in and out. weights: packed by pack_depthwise_weights.
std::vector<float> pack_depthwise_weights(const float* weight, int64_t c, int64_t kh, int64_t kw);
void depthwise_conv2d(const Image& in, const float* packed, int64_t kh, int64_t kw,
                      const Conv2dParams& p, const Epilogue& e, const Image& out, int threads);

// The same kernels on plain NCHW tensors, for the core's eager op: each
// task moves B channel planes of one image into a padded frame with the
// channels in the lanes, runs the blocked kernel on it and moves the result
// back. x: input of n x c x h x w at strides xs[0..3]; y: C-contiguous
// output; bias: c floats or null; scratch: depthwise_plain_scratch floats a
// thread (the frame, then the task's result).
int64_t depthwise_plain_scratch(int64_t h, int64_t w, const Conv2dParams& p, int64_t ho,
                                int64_t wo);
void depthwise_conv2d_plain(const float* x, const int64_t* xs, int64_t n, int64_t c, int64_t h,
                            int64_t w, const float* packed, int64_t kh, int64_t kw,
                            const Conv2dParams& p, const float* bias, float* y, int64_t ho,
                            int64_t wo, float* scratch, int threads);

// The gradients of depthwise_conv2d_plain, task by task as it runs: gy
// (n x c x ho x wo, C-contiguous) into gx (n x c x h x w, C-contiguous)
// unless null, and, unless sums is null, each task's (image i, channel
// block cb) sums over positions, in double, at sums + (i * cb_count + cb) *
// (kh * kw + 1) * B: for each tap the lanes' grad_weight, then grad_bias.
// The caller adds them over images, in order. scratch as the forward's.
void depthwise_backward_plain(const float* x, const int64_t* xs, int64_t n, int64_t c,
                              int64_t h, int64_t w, const float* packed, int64_t kh, int64_t kw,
                              const Conv2dParams& p, const float* gy, int64_t ho, int64_t wo,
                              float* gx, double* sums, float* scratch, int threads);

// ----------------------------------------------------------------- pooling

void max_pool2d(const Image& in, const Pool2dParams& p, const Image& out, int threads);
void avg_pool2d(const Image& in, const Pool2dParams& p, const Image& out, int threads);
// The mean of each channel over H x W, blocked (N, C, 1, 1).
void global_avg_pool(const Image& in, const Image& out, int threads);

// ----------------------------------------------------------------- elementwise

// out = act(a + b + ...), all of one shape and layout.
void add(const std::vector<Image>& in, Act act, const Image& out, int threads);
// out = x * s, s of shape (N, C, 1, 1) (squeeze-and-excitation) or of x's shape.
void mul(const Image& x, const Image& s, const Image& out, int threads);
// out = act(x * scale[c] + shift[c]) (an unfolded batch norm); scale or
// shift may be null (1 and 0).
void affine(const Image& x, const float* scale, const float* shift, Act act, const Image& out,
            int threads);
// Copies x into out's channels (a concatenation's slice when out is one).
void copy(const Image& x, const Image& out, int threads);
// Copies x's channels into out's channels [channel0, channel0 + x.c), lane
// by lane (a concatenation's branch that starts or ends inside a block);
// nothing else of out is written.
void copy_channels(const Image& x, const Image& out, int64_t channel0, int threads);
// Zeroes out's pad lanes (after copy_channels wrote its last block).
void clear_pad_lanes(const Image& out, int threads);

// Layout changes: the plain NCHW tensor to blocked (pad lanes zero) and back.
void to_blocked(const Image& plain, const Image& out, int threads);
void to_plain(const Image& in, const Image& plain, int threads);

}  // namespace blocked
}  // namespace convcore
