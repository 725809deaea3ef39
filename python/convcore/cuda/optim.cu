// Optimiser updates, one thread per parameter element, in place, with the
// formulas of convcore.optim (PyTorch's).
#include "common.cuh"

// SGD: g = grad + wd w; buf = g on the first step, else momentum buf +
// (1 - dampening) g; g = g + momentum buf (nesterov) or buf; w -= lr g.
// With momentum == 0, buf is not touched (may be null).
extern "C" __global__ void sgd_step(float* w, const float* __restrict__ grad, float* buf, int n,
                                    float lr, float momentum, float dampening, float wd,
                                    int nesterov, int first) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad[i] + wd * w[i];
    if (momentum != 0.f) {
        const float b = first ? g : momentum * buf[i] + (1.f - dampening) * g;
        buf[i] = b;
        g = nesterov ? g + momentum * b : b;
    }
    w[i] -= lr * g;
}

// Adam: g = grad + wd w; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// w -= step_size * m / (sqrt(v) / root_correction2 + eps), where the host
// passes step_size = lr / (1 - b1^t), root_correction2 = sqrt(1 - b2^t).
extern "C" __global__ void adam_step(float* w, const float* __restrict__ grad, float* m, float* v,
                                     int n, float step_size, float beta1, float beta2,
                                     float root_correction2, float eps, float wd) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grad[i] + wd * w[i];
    const float mi = beta1 * m[i] + (1.f - beta1) * g;
    const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    w[i] -= step_size * mi / (sqrtf(vi) / root_correction2 + eps);
}
