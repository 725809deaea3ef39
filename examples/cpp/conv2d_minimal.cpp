// The smallest use of the op API: conv2d on a plain buffer.
//
// The lecture's worked example: a 5x5 input, one 3x3 filter, stride 2,
// zero-padding 1 gives (5 - 3 + 2 * 1) / 2 + 1 = 3, a 3x3 output.
#include <cstdio>
#include <vector>

#include "convcore/convcore.h"

int main() {
  // input (N=1, C=1, H=5, W=5): the values 0..24
  std::vector<float> x(25);
  for (int i = 0; i < 25; ++i) x[i] = float(i);
  // weight (Cout=1, Cin=1, 3, 3): a vertical edge detector
  std::vector<float> w = {1, 0, -1,
                          1, 0, -1,
                          1, 0, -1};
  float b = 0.5f;

  convcore::Conv2dParams p;
  p.stride_h = p.stride_w = 2;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;

  const int64_t x_shape[4] = {1, 1, 5, 5}, w_shape[4] = {1, 1, 3, 3}, b_shape[1] = {1};
  const convcore::TensorView xv = convcore::contiguous_view(x.data(), convcore::DType::Float32, 4, x_shape);
  const convcore::TensorView wv = convcore::contiguous_view(w.data(), convcore::DType::Float32, 4, w_shape);
  const convcore::TensorView bv = convcore::contiguous_view(&b, convcore::DType::Float32, 1, b_shape);

  try {
    // The output's shape, with the same checks conv2d makes.
    const convcore::Shape4 o =
        convcore::conv2d_output_shape(convcore::shape4(xv), convcore::shape4(wv), p);
    std::vector<float> y(size_t(o.n * o.c * o.h * o.w));
    const int64_t y_shape[4] = {o.n, o.c, o.h, o.w};
    convcore::conv2d_forward(xv, wv, &bv, p,
                             convcore::contiguous_view(y.data(), convcore::DType::Float32, 4, y_shape));

    std::printf("conv2d: input 5x5, 3x3 filter, stride 2, padding 1 -> %lldx%lld\n",
                static_cast<long long>(o.h), static_cast<long long>(o.w));
    for (int64_t i = 0; i < o.h; ++i) {
      for (int64_t j = 0; j < o.w; ++j) std::printf(" %6.1f", y[size_t(i * o.w + j)]);
      std::printf("\n");
    }

    // A bad argument is an exception with the Python layer's message.
    p.groups = 2;
    convcore::conv2d_output_shape(convcore::shape4(xv), convcore::shape4(wv), p);
  } catch (const convcore::ValueError& e) {
    std::printf("ValueError: %s\n", e.what());
  }
  return 0;
}
