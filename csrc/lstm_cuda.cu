// CUDA implementation of fastmsc::lstm_fwd / fastmsc::lstm_bwd (schemas in lstm_cpu.cpp).
//
// Same algorithm as the CPU path: one cuBLAS GEMM for the input projections of all steps and both
// directions; per step one batched GEMM (both directions) for the recurrent term and one fused kernel
// for the gates and the cell/hidden update; backward per step one fused kernel and one batched GEMM,
// then the weight gradients and dx as a few large GEMMs. With a projection (w_hr) the gate kernel writes
// o * tanh(c) to a scratch buffer, one more batched GEMM projects it and a small kernel stores the result as
// state and output; the backward forms the gradient reaching h per step, maps it back through w_hr with one
// batched GEMM and keeps it for dW_hr. Everything runs on torch's current stream,
// lengths are read on the device only, and nothing synchronises with the host or allocates inside the
// time loop, so the layer can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "lstm_common.h"
#include "lstm_gates.h"

namespace fastmsc {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

// One thread per (direction d, batch row b, hidden unit j) of step `step` (forward order of each direction).
// kProj: h_state is the (D, B, H) scratch of o * tanh(c) that project_step_kernel turns into state and output;
// out is not touched here.
template <typename T, bool kTrain, bool kProj>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(T* __restrict__ xproj, const T* __restrict__ rec,
                                                                T* __restrict__ h_state, T* __restrict__ c_state,
                                                                T* __restrict__ out, T* __restrict__ cells,
                                                                const int64_t* __restrict__ lens, int64_t B,
                                                                int64_t steps, int64_t H, int64_t D, int64_t step) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= D * B * H) return;
  const int64_t j = idx % H, b = (idx / H) % B, d = idx / (H * B);
  const int64_t G = 4 * H;
  const int64_t t = d == 0 ? step : steps - 1 - step;
  const int64_t out_at = (b * steps + t) * D * H + d * H + j;
  if (lens != nullptr && t >= lens[b]) {  // past the sequence end: zero output, state carried
    if (!kProj) out[out_at] = T(0);
    return;
  }
  T* z = xproj + (b * steps + t) * D * G + d * G + j;
  T zi = z[0], zf = z[H], zg = z[2 * H], zo = z[3 * H];
  if (rec != nullptr) {
    const T* r = rec + (d * B + b) * G + j;
    zi += r[0];
    zf += r[H];
    zg += r[2 * H];
    zo += r[3 * H];
  }
  const int64_t state_at = (d * B + b) * H + j;
  T i, f, g, o, c, h;
  cell_forward(zi, zf, zg, zo, c_state[state_at], i, f, g, o, c, h);
  if (kTrain) {
    z[0] = i;
    z[H] = f;
    z[2 * H] = g;
    z[3 * H] = o;
    cells[out_at] = c;
  }
  c_state[state_at] = c;
  h_state[state_at] = h;
  if (!kProj) out[out_at] = h;
}

// With the projection, after the GEMM h_new (D, B, P) = (o * tanh(c)) · w_hrᵀ: one thread per (d, b, k) stores
// h_new as state and output where step `step` is valid, and a zero output past the sequence end.
template <typename T>
__global__ void __launch_bounds__(kThreads) project_step_kernel(const T* __restrict__ h_new, T* __restrict__ h_state,
                                                                T* __restrict__ out,
                                                                const int64_t* __restrict__ lens, int64_t B,
                                                                int64_t steps, int64_t P, int64_t D, int64_t step) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= D * B * P) return;
  const int64_t k = idx % P, b = (idx / P) % B, d = idx / (P * B);
  const int64_t t = d == 0 ? step : steps - 1 - step;
  const int64_t out_at = (b * steps + t) * D * P + d * P + k;
  if (lens != nullptr && t >= lens[b]) {
    out[out_at] = T(0);
    return;
  }
  const T h = h_new[idx];
  h_state[idx] = h;
  out[out_at] = h;
}

// With the projection, first part of the backward of step `step`: one thread per (d, b, k) forms the gradient
// reaching h (carry + output gradient; see backward_loop in lstm_cpu.cpp for the carry logic) into dh_all
// (B, T, D*P), kept for dW_hr, and dh_step (D, B, P), which the GEMM dr = dh_step · w_hr maps back to
// o * tanh(c); both are zero past the sequence end.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    projected_dh_kernel(const T* __restrict__ dout, const T* __restrict__ dh_rec, T* __restrict__ dh_state,
                        T* __restrict__ dh_all, T* __restrict__ dh_step, const int64_t* __restrict__ lens, int64_t B,
                        int64_t steps, int64_t P, int64_t D, int64_t step) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= D * B * P) return;
  const int64_t k = idx % P, b = (idx / P) % B, d = idx / (P * B);
  const int64_t t = d == 0 ? step : steps - 1 - step;
  const int64_t t_next = d == 0 ? t + 1 : t - 1;
  const int64_t len = lens != nullptr ? lens[b] : steps;
  const bool next_valid = step < steps - 1 && t_next >= 0 && t_next < len;
  const T dh_carry = next_valid ? dh_rec[idx] : dh_state[idx];
  const int64_t seq_at = (b * steps + t) * D * P + d * P + k;
  if (t >= len) {
    dh_all[seq_at] = dh_step[idx] = T(0);
    if (next_valid) dh_state[idx] = dh_carry;
    return;
  }
  dh_all[seq_at] = dh_step[idx] = dh_carry + (dout != nullptr ? dout[seq_at] : T(0));
}

// Backward of step `step` for both directions; see backward_loop in lstm_cpu.cpp for the carry logic.
// kProj: dh_rec is dr (D, B, H), the whole gradient reaching o * tanh(c) (projected_dh_kernel did the carry).
template <typename T, bool kProj>
__global__ void __launch_bounds__(kThreads) backward_step_kernel(
    const T* __restrict__ gates, const T* __restrict__ cells, const T* __restrict__ c0, const T* __restrict__ dout,
    const T* __restrict__ dh_rec, T* __restrict__ dh_state, T* __restrict__ dc_state, T* __restrict__ dgates,
    T* __restrict__ dg_step, const int64_t* __restrict__ lens, int64_t B, int64_t steps, int64_t H, int64_t D,
    int64_t step) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= D * B * H) return;
  const int64_t j = idx % H, b = (idx / H) % B, d = idx / (H * B);
  const int64_t G = 4 * H;
  const int64_t t = d == 0 ? step : steps - 1 - step;
  const int64_t t_next = d == 0 ? t + 1 : t - 1;
  const int64_t t_prev = d == 0 ? t - 1 : t + 1;
  const int64_t len = lens != nullptr ? lens[b] : steps;
  const int64_t state_at = (d * B + b) * H + j;
  const bool next_valid = step < steps - 1 && t_next >= 0 && t_next < len;
  // With the projection dh_state is P wide and not read here.
  T dh_carry = T(0);
  if (!kProj) dh_carry = next_valid ? dh_rec[state_at] : dh_state[state_at];
  T* dg = dgates + (b * steps + t) * D * G + d * G + j;
  T* dgs = dg_step + (d * B + b) * G + j;
  if (t >= len) {
    dg[0] = dg[H] = dg[2 * H] = dg[3 * H] = T(0);
    dgs[0] = dgs[H] = dgs[2 * H] = dgs[3 * H] = T(0);
    if (!kProj && next_valid) dh_state[state_at] = dh_carry;
    return;
  }
  const bool first = d == 0 ? t == 0 : t == len - 1;
  const int64_t seq_at = b * steps * D * H + d * H + j;
  const T c_prev = first ? (c0 != nullptr ? c0[state_at] : T(0)) : cells[seq_at + t_prev * D * H];
  const T dh = kProj ? dh_rec[state_at] : dh_carry + (dout != nullptr ? dout[seq_at + t * D * H] : T(0));
  const T* a = gates + (b * steps + t) * D * G + d * G + j;
  T dzi, dzf, dzg, dzo, dc_prev;
  cell_backward(a[0], a[H], a[2 * H], a[3 * H], cells[seq_at + t * D * H], c_prev, dh, dc_state[state_at], dzi, dzf,
                dzg, dzo, dc_prev);
  dg[0] = dgs[0] = dzi;
  dg[H] = dgs[H] = dzf;
  dg[2 * H] = dgs[2 * H] = dzg;
  dg[3 * H] = dgs[3 * H] = dzo;
  dc_state[state_at] = dc_prev;
}

// h0 gradient: the last recurrent GEMM's value where the forward's first step was valid, else the carry.
template <typename T>
__global__ void __launch_bounds__(kThreads) finish_dh0_kernel(const T* __restrict__ dh_rec, T* __restrict__ dh_state,
                                                              const int64_t* __restrict__ lens, int64_t B,
                                                              int64_t steps, int64_t H, int64_t D) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= D * B * H) return;
  const int64_t b = (idx / H) % B, d = idx / (H * B);
  const int64_t t_first = d == 0 ? 0 : steps - 1;
  if (lens == nullptr || t_first < lens[b]) dh_state[idx] = dh_rec[idx];
}

// h_prev (B, T, D*H): the state each step's recurrent GEMM used, zero at padded steps.
template <typename T>
__global__ void __launch_bounds__(kThreads) fill_h_prev_kernel(const T* __restrict__ out, const T* __restrict__ h0,
                                                               T* __restrict__ h_prev, const int64_t* __restrict__ lens,
                                                               int64_t B, int64_t steps, int64_t H, int64_t D) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * steps * D * H) return;
  const int64_t j = idx % H, d = (idx / H) % D, t = (idx / (H * D)) % steps, b = idx / (H * D * steps);
  const int64_t len = lens != nullptr ? lens[b] : steps;
  T value = T(0);
  if (t < len) {
    const bool first = d == 0 ? t == 0 : t == len - 1;
    if (first) {
      if (h0 != nullptr) value = h0[(d * B + b) * H + j];
    } else {
      const int64_t t_prev = d == 0 ? t - 1 : t + 1;
      value = out[(b * steps + t_prev) * D * H + d * H + j];
    }
  }
  h_prev[idx] = value;
}

// With the projection, for dW_hr: o * tanh(c) (B, T, D*H) of every step, recomputed from the saved gates and
// cells as the forward computed it; zero past the sequence end (where the forward wrote neither).
template <typename T>
__global__ void __launch_bounds__(kThreads) fill_unprojected_kernel(const T* __restrict__ gates,
                                                                    const T* __restrict__ cells, T* __restrict__ hidden,
                                                                    const int64_t* __restrict__ lens, int64_t B,
                                                                    int64_t steps, int64_t H, int64_t D) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * steps * D * H) return;
  const int64_t j = idx % H, d = (idx / H) % D, t = (idx / (H * D)) % steps, b = idx / (H * D * steps);
  T value = T(0);
  if (lens == nullptr || t < lens[b]) {
    const T o = gates[(b * steps + t) * D * 4 * H + d * 4 * H + 3 * H + j];
    value = o * tanh_(cells[idx]);
  }
  hidden[idx] = value;
}

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return plain_empty(sizes, options); }
  static bool reads_time_major(const LstmSizes&, at::ScalarType) { return false; }
  static constexpr bool kReturnsTimeMajor = false;
  static at::Tensor forward(const LstmSizes& s, const LstmForward& f, const at::Tensor& w_ih,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0, bool training,
                            const c10::optional<at::Tensor>& w_hr_in);
  static void backward(LstmBackward& bw);
};

at::Tensor CudaBackend::forward(const LstmSizes& s, const LstmForward& f, const at::Tensor& w_ih,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0,
                                bool training, const c10::optional<at::Tensor>& w_hr_in) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, G = 4 * H, R = s.proj;
  const at::Tensor &x = f.x, &w_hh = f.w_hh, &lens = f.lens, &out = f.out, &h_n = f.h_n, &c_n = f.c_n,
                   &cells = f.cells;
  at::Tensor xproj = input_projection(s, x, w_ih, bias);
  at::Tensor rec = at::empty({D, B, G}, x.options());
  const at::Tensor w_hh_t = w_hh.transpose(1, 2);
  // With the projection: o * tanh(c) of the step (D, B, H), zeroed so that rows past their end stay finite in
  // the GEMM, and its projection (D, B, P) through w_hrᵀ (D, H, P).
  const at::Tensor w_hr_t = s.projected ? w_hr_in->transpose(1, 2) : at::Tensor();
  at::Tensor unprojected = s.projected ? at::zeros({D, B, H}, x.options()) : at::Tensor();
  at::Tensor h_new = s.projected ? at::empty({D, B, R}, x.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = D * B * H;
  // An empty batch: nothing to compute, and a kernel must not be launched with an empty grid.
  if (B == 0) return training ? xproj : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmsc::lstm_fwd_cuda", [&] {
    using T = scalar_t;
    const int64_t* lens_ptr = ptr_or_null<int64_t>(lens);
    for (int64_t step = 0; step < T_; ++step) {
      const bool use_rec = step > 0 || present(h0);  // without h0 the first recurrent product is zero
      if (use_rec) at::bmm_out(rec, h_n, w_hh_t);
      const T* rec_ptr = use_rec ? rec.data_ptr<T>() : nullptr;
      T* cells_ptr = training ? cells.data_ptr<T>() : nullptr;
      if (s.projected) {
        if (training) {
          forward_step_kernel<T, true, true><<<blocks_for(n), kThreads, 0, stream>>>(
              xproj.data_ptr<T>(), rec_ptr, unprojected.data_ptr<T>(), c_n.data_ptr<T>(), nullptr, cells_ptr,
              lens_ptr, B, T_, H, D, step);
        } else {
          forward_step_kernel<T, false, true><<<blocks_for(n), kThreads, 0, stream>>>(
              xproj.data_ptr<T>(), rec_ptr, unprojected.data_ptr<T>(), c_n.data_ptr<T>(), nullptr, nullptr,
              lens_ptr, B, T_, H, D, step);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::bmm_out(h_new, unprojected, w_hr_t);
        project_step_kernel<T><<<blocks_for(D * B * R), kThreads, 0, stream>>>(
            h_new.data_ptr<T>(), h_n.data_ptr<T>(), out.data_ptr<T>(), lens_ptr, B, T_, R, D, step);
      } else if (training) {
        forward_step_kernel<T, true, false><<<blocks_for(n), kThreads, 0, stream>>>(
            xproj.data_ptr<T>(), rec_ptr, h_n.data_ptr<T>(), c_n.data_ptr<T>(), out.data_ptr<T>(), cells_ptr,
            lens_ptr, B, T_, H, D, step);
      } else {
        forward_step_kernel<T, false, false><<<blocks_for(n), kThreads, 0, stream>>>(
            xproj.data_ptr<T>(), rec_ptr, h_n.data_ptr<T>(), c_n.data_ptr<T>(), out.data_ptr<T>(), nullptr,
            lens_ptr, B, T_, H, D, step);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return training ? xproj : at::empty({0}, x.options());
}

void CudaBackend::backward(LstmBackward& bw) {
  const LstmSizes& s = bw.s;
  const bool need_dstate = bw.need_dstate, need_dweights = bw.need_dweights;
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, G = 4 * H, N = B * T_, R = s.proj;
  const at::Tensor &x = bw.x, &w_hh = bw.w_hh, &w_hr = bw.w_hr, &out = bw.out, &gates = bw.gates, &cells = bw.cells;
  const at::Tensor &dout = bw.dout, &lens = bw.lens, &c0c = bw.c0, &h0c = bw.h0;
  at::Tensor &dh_state = bw.dh_state, &dc_state = bw.dc_state, &dh_rec = bw.dh_rec, &dgates = bw.dgates;
  at::Tensor &dh_all = bw.dh_all, &dr = bw.dr, &h_prev = bw.h_prev, &unprojected = bw.unprojected;
  at::Tensor dg_step = at::empty({D, B, G}, x.options());
  // With the projection: the gradient reaching h of one step (D, B, P), mapped back through w_hr into dr.
  at::Tensor dh_step = s.projected ? at::empty({D, B, R}, x.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = D * B * H, n_state = D * B * R;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmsc::lstm_bwd_cuda", [&] {
    using T = scalar_t;
    const int64_t* lens_ptr = ptr_or_null<int64_t>(lens);
    for (int64_t step = T_ - 1; step >= 0; --step) {
      if (s.projected) {
        projected_dh_kernel<T><<<blocks_for(n_state), kThreads, 0, stream>>>(
            ptr_or_null<T>(dout), dh_rec.data_ptr<T>(), dh_state.data_ptr<T>(), dh_all.data_ptr<T>(),
            dh_step.data_ptr<T>(), lens_ptr, B, T_, R, D, step);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::bmm_out(dr, dh_step, w_hr);
        backward_step_kernel<T, true><<<blocks_for(n), kThreads, 0, stream>>>(
            gates.data_ptr<T>(), cells.data_ptr<T>(), ptr_or_null<T>(c0c), nullptr, dr.data_ptr<T>(), nullptr,
            dc_state.data_ptr<T>(), dgates.data_ptr<T>(), dg_step.data_ptr<T>(), lens_ptr, B, T_, H, D, step);
      } else {
        backward_step_kernel<T, false><<<blocks_for(n), kThreads, 0, stream>>>(
            gates.data_ptr<T>(), cells.data_ptr<T>(), ptr_or_null<T>(c0c), ptr_or_null<T>(dout),
            dh_rec.data_ptr<T>(), dh_state.data_ptr<T>(), dc_state.data_ptr<T>(), dgates.data_ptr<T>(),
            dg_step.data_ptr<T>(), lens_ptr, B, T_, H, D, step);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (step > 0 || need_dstate) at::bmm_out(dh_rec, dg_step, w_hh);
    }
    if (need_dstate) {
      // Indexed by (d, b, k) over the R-wide h state.
      finish_dh0_kernel<T><<<blocks_for(n_state), kThreads, 0, stream>>>(
          dh_rec.data_ptr<T>(), dh_state.data_ptr<T>(), lens_ptr, B, T_, R, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_dweights) {
      allocate_weight_inputs(bw);
      fill_h_prev_kernel<T><<<blocks_for(N * D * R), kThreads, 0, stream>>>(
          out.data_ptr<T>(), ptr_or_null<T>(h0c), h_prev.data_ptr<T>(), lens_ptr, B, T_, R, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (s.projected) {
        fill_unprojected_kernel<T><<<blocks_for(N * D * H), kThreads, 0, stream>>>(
            gates.data_ptr<T>(), cells.data_ptr<T>(), unprojected.data_ptr<T>(), lens_ptr, B, T_, H, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
}

}  // namespace
}  // namespace fastmsc

TORCH_LIBRARY_IMPL(fastmsc, CUDA, m) {
  m.impl("lstm_fwd", &fastmsc::lstm_fwd<fastmsc::CudaBackend>);
  m.impl("lstm_bwd", &fastmsc::lstm_bwd<fastmsc::CudaBackend>);
}
