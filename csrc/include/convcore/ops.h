// The op functions of the core. Inputs may have any strides; outputs must
// be C-contiguous views of the exact output shape (see shapes.h), written
// in full. float32 and float64; all arrays of one call share one dtype.
#pragma once
#include <vector>

#include "convcore/shapes.h"
#include "convcore/tensor.h"

namespace convcore {

// output (N, Cout, Ho, Wo) = conv(input (N, Cin, H, W), weight (Cout, Cin/groups, kH, kW)) + bias (Cout)
void conv2d_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const Conv2dParams& p, const TensorView& output);

// Any of grad_input, grad_weight, grad_bias may be null to skip it.
void conv2d_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const Conv2dParams& p,
                     const TensorView* grad_input, const TensorView* grad_weight,
                     const TensorView* grad_bias);

// Convolution plans: each (shape, parameters, pass, dtype, instruction set,
// thread count) is planned once and the plan cached. With autotune on, the
// first call of a shape with algorithm auto times the algorithms that apply
// (on the caller's arguments and output buffers) and keeps the fastest; off
// (the default), the rules choose, and results are deterministic.
void set_conv_autotune(bool on);
bool get_conv_autotune();
int64_t conv_plan_cache_size();
void clear_conv_plan_cache();

// indices (optional, int64): flat h * W + w index of the max in each input plane.
void max_pool2d_forward(const TensorView& input, const Pool2dParams& p, const TensorView& output,
                        const TensorView* indices);
void max_pool2d_backward(const TensorView& grad_output, const TensorView& input,
                         const Pool2dParams& p, const TensorView& grad_input);
// The same from the indices max_pool2d_forward returned (no search of the
// input): grad_input[n, c].flat[indices[n, c, i, j]] += grad_output[n, c, i, j].
// An index outside the input plane is a ValueError.
void max_pool2d_backward_indices(const TensorView& grad_output, const TensorView& indices,
                                 const TensorView& grad_input);

void avg_pool2d_forward(const TensorView& input, const Pool2dParams& p, const TensorView& output);
void avg_pool2d_backward(const TensorView& grad_output, const Pool2dParams& p,
                         const TensorView& grad_input);

void adaptive_avg_pool2d_forward(const TensorView& input, const TensorView& output);
void adaptive_avg_pool2d_backward(const TensorView& grad_output, const TensorView& grad_input);

// output (M, out) = input (M, in) @ weight (out, in)^T + bias (out)
void linear_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const TensorView& output);
void linear_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const TensorView* grad_input,
                     const TensorView* grad_weight, const TensorView* grad_bias);

// Concatenation along dim (negative counts from the end), as torch.cat:
// the inputs of one dtype and of equal shapes outside dim; concatenate_shape
// checks them and gives the output's shape.
std::vector<int64_t> concatenate_shape(const std::vector<TensorView>& inputs, int64_t dim);
void concatenate(const std::vector<TensorView>& inputs, int64_t dim, const TensorView& output);

// One step of torch.optim.SGD on one parameter, in place:
//   g = grad + weight_decay * param
//   buf = g (first), else momentum * buf + (1 - dampening) * g   (momentum != 0)
//   g = g + momentum * buf if nesterov else buf                   (momentum != 0)
//   param -= lr * g
// All contiguous and of param's shape and dtype; momentum_buffer is read
// (unless first) and written when momentum != 0, ignored otherwise.
struct SgdParams {
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, first = false;
};
void sgd_step(const TensorView& param, const TensorView& grad, const TensorView* momentum_buffer,
              const SgdParams& p);

// One step of torch.optim.Adam on one parameter, in place (L2 weight decay
// added to the gradient, eps after the square root):
//   g = grad + weight_decay * param
//   exp_avg = beta1 * exp_avg + (1 - beta1) * g
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
//   param -= step_size * exp_avg / (sqrt(exp_avg_sq) / root_correction2 + eps)
// with step_size = lr / (1 - beta1^t), root_correction2 = sqrt(1 - beta2^t).
struct AdamParams {
  double step_size = 0, beta1 = 0.9, beta2 = 0.999, root_correction2 = 1, eps = 1e-8,
         weight_decay = 0;
};
void adam_step(const TensorView& param, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const AdamParams& p);

// input + other, elementwise, over views of one shape and dtype.
void add_forward(const TensorView& input, const TensorView& other, const TensorView& output);
// input * other, elementwise: other of input's shape, or one value per image
// and channel ((N, C, 1, ..., 1) against input's (N, C, ...): a
// squeeze-and-excitation gate). output has input's shape.
void mul_forward(const TensorView& input, const TensorView& other, const TensorView& output);
// output[n, c] = sum over the plane (n, c) of input * other, for views of one
// shape (N, C, ...) and output (N, C, 1, ..., 1): the gradient of a
// per-channel gate (mul_forward's other) from grad_output and the gated
// input, in one pass. Summed in double, in an order fixed by the shape.
void mul_sum_planes(const TensorView& input, const TensorView& other, const TensorView& output);

// Elementwise over views of any (equal) shape.
void relu_forward(const TensorView& input, const TensorView& output);
void relu_backward(const TensorView& grad_output, const TensorView& input,
                   const TensorView& grad_input);

// Sigmoid, SiLU (x sigmoid(x)), ReLU6, Hardswish, Hardsigmoid, as PyTorch
// defines them (its gradients at the kinks too); elementwise, output may be
// the input (in place).
enum class Activation { Sigmoid, SiLU, ReLU6, Hardswish, Hardsigmoid };
void activation_forward(Activation kind, const TensorView& input, const TensorView& output);
void activation_backward(Activation kind, const TensorView& grad_output, const TensorView& input,
                         const TensorView& grad_input);

// Softmax along dim (in [-ndim, ndim - 1]; a 0-d input takes 0 or -1), as
// torch.softmax: exp(x - max) / sum(exp(x - max)); a line holding a NaN is
// all NaN. The backward takes the forward's output:
// grad_input = output * (grad_output - sum(grad_output * output, dim)).
void softmax_forward(const TensorView& input, int64_t dim, const TensorView& output);
void softmax_backward(const TensorView& grad_output, const TensorView& output, int64_t dim,
                      const TensorView& grad_input);
// log(softmax) in one pass, as torch.log_softmax: x - max - log(sum(exp(x - max))).
// The backward takes its output: grad_input = grad_output - exp(output) * sum(grad_output, dim).
void log_softmax_forward(const TensorView& input, int64_t dim, const TensorView& output);
void log_softmax_backward(const TensorView& grad_output, const TensorView& output, int64_t dim,
                          const TensorView& grad_input);

}  // namespace convcore

namespace convcore {

// Local response normalisation across channels (PyTorch's formula):
// output[c] = input[c] / (k + alpha / size * sum_{c' in window(c)} input[c']^2)^beta,
// window(c) = [c - size / 2, c + (size - 1) / 2] clipped to the channels.
// input (N, C, ...) with any trailing dims.
struct LrnParams {
  int64_t size = 5;
  double alpha = 1e-4, beta = 0.75, k = 1.0;
};
void local_response_norm_forward(const TensorView& input, const LrnParams& p,
                                 const TensorView& output);
void local_response_norm_backward(const TensorView& grad_output, const TensorView& input,
                                  const LrnParams& p, const TensorView& grad_input);

// Batch normalisation over (N, H, W) per channel of input (N, C, ...).
// Training: normalises with the batch statistics and writes them to
// batch_mean and batch_var (biased) for the caller's running averages.
// Evaluation: normalises with the given mean and var.
// weight and bias may be null (1 and 0). relu: output = max(bn(x), 0), in
// the same pass (a BatchNorm followed by a ReLU).
void batch_norm_forward(const TensorView& input, const TensorView* weight, const TensorView* bias,
                        bool training, double eps, const TensorView& mean, const TensorView& var,
                        const TensorView& output, bool relu = false);
// grad_input from the statistics the forward used (the batch's when
// training, recomputed from input; mean and var when not). relu_output:
// the output of a forward with relu, whose gradient grad_output is (it
// flows only where that output is positive, as relu_backward).
void batch_norm_backward(const TensorView& grad_output, const TensorView& input,
                         const TensorView* weight, bool training, double eps,
                         const TensorView& mean, const TensorView& var,
                         const TensorView* grad_input, const TensorView* grad_weight,
                         const TensorView* grad_bias, const TensorView* relu_output = nullptr);

}  // namespace convcore
