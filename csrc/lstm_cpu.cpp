// fastmsc::lstm_fwd / fastmsc::lstm_bwd: op schemas and the CPU implementation of one (bi)directional
// LSTM layer, batch first.
//
// Forward: one GEMM projects every time step of both directions (xproj = x @ w_ih^T + bias, laid out
// (B, T, D*4H)); per step each direction adds h_prev @ w_hh^T into its slice of xproj in place and one
// vectorised pass turns the pre-activations into the activated gates (kept in place for backward),
// c and h. The two directions are independent recurrences and run on two threads.
// Backward: BPTT with one pass per step (gate gradients dG) and the recurrent GEMM dh = dG @ w_hh;
// dW_ih = dG^T x, dW_hh = dG^T h_prev, the bias gradient and dx are a few large GEMMs after the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "lstm_common.h"
#include "lstm_gates.h"

#ifdef FASTMSC_PYTHON_MODULE
// Built by setup.py as the Python extension module fastmsc._C: importing it runs the op registrations
// below; it defines no Python functions (the ops are reached through torch.ops.fastmsc).
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastmsc LSTM ops (torch.ops.fastmsc.lstm_*)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif

// Runtime-dispatched ISA variants (baseline x86-64, AVX2+FMA, AVX-512) of the pointwise loops, so a
// distributed build vectorises at the machine's width without -march=native.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTMSC_NO_TARGET_CLONES)
#define FASTMSC_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FASTMSC_CLONES
#endif

namespace fastmsc {
namespace {

// ---------------------------------------------------------------------------------------------------
// Pointwise row kernels: one batch row, H hidden units. Separate restrict pointers per gate block so
// the compiler sees no aliasing and vectorises without runtime checks.

template <typename T, bool kTrain>
FASTMSC_HD void forward_row(T* __restrict zi, T* __restrict zf, T* __restrict zg, T* __restrict zo,
                            T* __restrict c_state, T* __restrict h_state, T* __restrict h_out,
                            T* __restrict c_out, int64_t H) {
#pragma GCC ivdep
  for (int64_t j = 0; j < H; ++j) {
    T i, f, g, o, c, h;
    cell_forward(zi[j], zf[j], zg[j], zo[j], c_state[j], i, f, g, o, c, h);
    if constexpr (kTrain) {
      zi[j] = i;
      zf[j] = f;
      zg[j] = g;
      zo[j] = o;
      c_out[j] = c;
    }
    c_state[j] = c;
    h_state[j] = h;
    h_out[j] = h;
  }
}

template <typename T>
FASTMSC_HD void backward_row(const T* __restrict act, const T* __restrict c, const T* __restrict c_prev,
                             const T* __restrict dh_carry, const T* __restrict dout, T* __restrict dc_state,
                             T* __restrict dgates, int64_t H) {
  const T* __restrict ai = act;
  const T* __restrict af = act + H;
  const T* __restrict ag = act + 2 * H;
  const T* __restrict ao = act + 3 * H;
  T* __restrict di = dgates;
  T* __restrict df = dgates + H;
  T* __restrict dg = dgates + 2 * H;
  T* __restrict dq = dgates + 3 * H;
#pragma GCC ivdep
  for (int64_t j = 0; j < H; ++j) {
    T dc_prev;
    cell_backward(ai[j], af[j], ag[j], ao[j], c[j], c_prev[j], dh_carry[j] + dout[j], dc_state[j], di[j], df[j],
                  dg[j], dq[j], dc_prev);
    dc_state[j] = dc_prev;
  }
}

#define FASTMSC_ROW_VARIANTS(T, SUFFIX, CLONES)                                                               \
  CLONES void forward_row_train_##SUFFIX(T* zi, T* zf, T* zg, T* zo, T* cs, T* hs, T* ho, T* co, int64_t H) {  \
    forward_row<T, true>(zi, zf, zg, zo, cs, hs, ho, co, H);                                                 \
  }                                                                                                           \
  CLONES void forward_row_infer_##SUFFIX(T* zi, T* zf, T* zg, T* zo, T* cs, T* hs, T* ho, T* co, int64_t H) {  \
    forward_row<T, false>(zi, zf, zg, zo, cs, hs, ho, co, H);                                                \
  }                                                                                                           \
  CLONES void backward_row_##SUFFIX(const T* act, const T* c, const T* cp, const T* dh, const T* dout, T* dc, \
                                    T* dgates, int64_t H) {                                                   \
    backward_row<T>(act, c, cp, dh, dout, dc, dgates, H);                                                     \
  }

FASTMSC_ROW_VARIANTS(float, f32, FASTMSC_CLONES)
FASTMSC_ROW_VARIANTS(double, f64, )  // float64 is the checking dtype: exp is libm's, no variants needed

template <typename T>
struct Rows;
template <>
struct Rows<float> {
  static constexpr auto fwd_train = forward_row_train_f32;
  static constexpr auto fwd_infer = forward_row_infer_f32;
  static constexpr auto bwd = backward_row_f32;
};
template <>
struct Rows<double> {
  static constexpr auto fwd_train = forward_row_train_f64;
  static constexpr auto fwd_infer = forward_row_infer_f64;
  static constexpr auto bwd = backward_row_f64;
};

// C (m x n, row stride ldc) = beta*C + A (m x k, row stride lda) @ op(B), B given row-major as (k x n)
// or, with b_transposed, as (n x k). at::cpu::addmm_out calls torch's CPU BLAS (MKL/OpenBLAS) without
// the dispatcher: the per-step GEMMs are small and run thousands of times. The matrices are wrapped as
// non-owning tensors over the workspaces, which costs no allocation of data.
template <typename T>
void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                   bool b_transposed, T beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a_t = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options);
  const at::Tensor b_t = b_transposed ? at::from_blob(const_cast<T*>(b), {k, n}, {1, ldb}, options)
                                      : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, options);
  at::Tensor c_t = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::cpu::mm_out(c_t, a_t, b_t);
  } else {
    at::cpu::addmm_out(c_t, c_t, a_t, b_t, beta, 1);
  }
}

inline bool run_directions_in_parallel(int64_t directions) {
  return directions == 2 && at::get_num_threads() > 1 && !at::in_parallel_region();
}

template <typename F>
void for_each_direction(int64_t directions, const F& fn) {
  if (run_directions_in_parallel(directions)) {
    at::parallel_for(0, directions, 1, [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) fn(d);
    });
  } else {
    for (int64_t d = 0; d < directions; ++d) fn(d);
  }
}

// Rows per parallel chunk of a pointwise pass: below ~16k elements a thread fork costs more than it saves.
inline int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

// ---------------------------------------------------------------------------------------------------

template <typename T>
void forward_impl(const LstmSizes& s, const at::Tensor& w_hh, const int64_t* lens, bool has_h0, bool training,
                  at::Tensor& xproj, at::Tensor& out, at::Tensor& h_state, at::Tensor& c_state, at::Tensor& cells) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, G = 4 * H;
  const int64_t ld_gates = T_ * D * G;  // stride between batch rows of one step's gate slice
  const int64_t ld_out = T_ * D * H;
  T* xp = xproj.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  T* cells_ptr = training ? cells.data_ptr<T>() : nullptr;
  const auto row = training ? Rows<T>::fwd_train : Rows<T>::fwd_infer;

  for_each_direction(D, [&](int64_t d) {
    const T* w = w_hh.data_ptr<T>() + d * G * H;
    T* hs = h_state.data_ptr<T>() + d * B * H;
    T* cs = c_state.data_ptr<T>() + d * B * H;
    for (int64_t step = 0; step < T_; ++step) {
      const int64_t t = d == 0 ? step : T_ - 1 - step;
      T* gates_t = xp + t * D * G + d * G;
      // Without h0 the first recurrent product is zero.
      if (step > 0 || has_h0) {
        gemm_rowmajor<T>(B, G, H, hs, H, w, H, /*b_transposed=*/true, T(1), gates_t, ld_gates);
      }
      at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          T* h_out = o_ptr + b * ld_out + t * D * H + d * H;
          if (lens != nullptr && t >= lens[b]) {
            // Past this sequence's end: output zero, state carried unchanged (as packing gives).
            std::fill(h_out, h_out + H, T(0));
            continue;
          }
          T* z = gates_t + b * ld_gates;
          T* c_out = training ? cells_ptr + b * ld_out + t * D * H + d * H : nullptr;
          row(z, z + H, z + 2 * H, z + 3 * H, cs + b * H, hs + b * H, h_out, c_out, H);
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
    const c10::optional<at::Tensor>& lengths, bool training) {
  const LstmSizes s = check_lstm_args(x_in, w_ih, w_hh_in, bias, h0, c0, lengths);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w_hh = w_hh_in.contiguous();
  at::Tensor xproj = input_projection(s, x, w_ih, bias);
  at::Tensor out = at::empty({B, T_, D * H}, x.options());
  at::Tensor h_n = state_or_zeros(h0, s, x);
  at::Tensor c_n = state_or_zeros(c0, s, x);
  at::Tensor cells = training ? at::empty({B, T_, D * H}, x.options()) : at::empty({0}, x.options());
  const at::Tensor lens = present(lengths) ? lengths->contiguous() : at::Tensor();
  const int64_t* lens_ptr = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmsc::lstm_fwd", [&] {
    forward_impl<scalar_t>(s, w_hh, lens_ptr, present(h0), training, xproj, out, h_n, c_n, cells);
  });
  at::Tensor gates = training ? xproj : at::empty({0}, x.options());
  return {out, h_n, c_n, gates, cells};
}

// ---------------------------------------------------------------------------------------------------

template <typename T>
void backward_loop(const LstmSizes& s, const at::Tensor& w_hh, const int64_t* lens, const T* c0, const T* dout,
                   const T* gates, const T* cells, bool need_dstate, T* dgates, T* dh_state, T* dh_rec, T* dc_state) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, G = 4 * H;
  const int64_t ld_gates = T_ * D * G, ld_state = T_ * D * H;
  std::vector<T> zeros(H, T(0));
  const T* zero_row = zeros.data();

  for_each_direction(D, [&](int64_t d) {
    const T* w = w_hh.data_ptr<T>() + d * G * H;
    T* dhs = dh_state + d * B * H;
    T* dhr = dh_rec + d * B * H;
    T* dcs = dc_state + d * B * H;
    // Backward walks the forward order in reverse. "next" is the step the forward ran after t (handled
    // just before in this loop), "prev" the one it ran before t.
    for (int64_t step = T_ - 1; step >= 0; --step) {
      const int64_t t = d == 0 ? step : T_ - 1 - step;
      const int64_t t_next = d == 0 ? t + 1 : t - 1;
      const int64_t t_prev = d == 0 ? t - 1 : t + 1;
      T* dg_t = dgates + t * D * G + d * G;
      at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t len = lens != nullptr ? lens[b] : T_;
          const bool next_valid = step < T_ - 1 && t_next >= 0 && t_next < len;
          // dh reaching h_t: from the recurrent GEMM of the step handled before, else the carried value
          // (the h_n gradient before a sequence's last step, or a finished sequence's h0 gradient).
          const T* dh_carry = next_valid ? dhr + b * H : dhs + b * H;
          T* dg_row = dg_t + b * ld_gates;
          if (t >= len) {
            std::fill(dg_row, dg_row + G, T(0));
            if (next_valid) std::copy(dh_carry, dh_carry + H, dhs + b * H);
            continue;
          }
          const bool first = d == 0 ? t == 0 : t == len - 1;
          const int64_t offset = b * ld_state + d * H;
          const T* c_prev = first ? (c0 != nullptr ? c0 + (d * B + b) * H : zero_row) : cells + offset + t_prev * D * H;
          const T* dout_row = dout != nullptr ? dout + offset + t * D * H : zero_row;
          Rows<T>::bwd(gates + b * ld_gates + t * D * G + d * G, cells + offset + t * D * H, c_prev, dh_carry,
                       dout_row, dcs + b * H, dg_row, H);
        }
      });
      // dh_{t_prev} = dG_t @ w_hh; the very last one is the h0 gradient, needed only when asked for.
      if (step > 0 || need_dstate) {
        gemm_rowmajor<T>(B, H, G, dg_t, ld_gates, w, H, /*b_transposed=*/false, T(0), dhr, H);
      }
    }
    if (need_dstate) {
      // h0 gradient: the last GEMM's result where the forward's first step was valid for the row, else
      // the value carried when the sequence finished.
      const int64_t t_first = d == 0 ? 0 : T_ - 1;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = lens != nullptr ? lens[b] : T_;
        if (t_first < len) std::copy(dhr + b * H, dhr + (b + 1) * H, dhs + b * H);
      }
    }
  });
}

// h_prev for every (b, t, d): the hidden state each step's recurrent GEMM used (h0 or zero at a
// sequence's first step), zero at padded steps so that dW_hh = dG^T h_prev is one GEMM per direction.
template <typename T>
void fill_h_prev(const LstmSizes& s, const int64_t* lens, const T* out, const T* h0, T* h_prev) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions;
  const int64_t ld = T_ * D * H;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = lens != nullptr ? lens[b] : T_;
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t d = 0; d < D; ++d) {
          T* dst = h_prev + b * ld + t * D * H + d * H;
          if (t >= len) {
            std::fill(dst, dst + H, T(0));
            continue;
          }
          const bool first = d == 0 ? t == 0 : t == len - 1;
          if (first) {
            if (h0 != nullptr) {
              std::copy(h0 + (d * B + b) * H, h0 + (d * B + b + 1) * H, dst);
            } else {
              std::fill(dst, dst + H, T(0));
            }
          } else {
            const int64_t t_prev = d == 0 ? t - 1 : t + 1;
            const T* src = out + b * ld + t_prev * D * H + d * H;
            std::copy(src, src + H, dst);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_bwd_cpu(
    const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& grad_h_n,
    const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& x_in, const at::Tensor& w_ih,
    const at::Tensor& w_hh_in, bool has_bias, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths, const at::Tensor& out_in,
    const at::Tensor& gates_in, const at::Tensor& cells_in, bool need_dx, bool need_dweights, bool need_dstate) {
  const LstmSizes s = check_lstm_args(x_in, w_ih, w_hh_in, c10::nullopt, h0, c0, lengths);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, N = B * T_;
  const std::vector<int64_t> seq_shape{B, T_, D * H};
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(seq_shape) && cells_in.sizes() == out_in.sizes(),
              "fastmsc::lstm_bwd: out and cells must have shape ", at::IntArrayRef(seq_shape), ", got ",
              out_in.sizes(), " and ", cells_in.sizes(), " (was the forward run with training=True?)");
  TORCH_CHECK(gates_in.sizes() == at::IntArrayRef({B, T_, D * 4 * H}), "fastmsc::lstm_bwd: gates must have shape (",
              B, ", ", T_, ", ", D * 4 * H, "), got ", gates_in.sizes());
  const at::Tensor x = x_in.contiguous(), w_hh = w_hh_in.contiguous(), out = out_in.contiguous();
  const at::Tensor gates = gates_in.contiguous(), cells = cells_in.contiguous();
  const at::Tensor dout = present(grad_out) ? grad_out->contiguous() : at::Tensor();
  if (dout.defined()) {
    TORCH_CHECK(dout.sizes() == out.sizes(), "fastmsc::lstm_bwd: grad_out must have shape ", out.sizes(), ", got ",
                dout.sizes());
  }
  at::Tensor dh_state = state_or_zeros(grad_h_n, s, x);
  at::Tensor dc_state = state_or_zeros(grad_c_n, s, x);
  at::Tensor dh_rec = at::empty({D, B, H}, x.options());
  at::Tensor dgates = at::empty({B, T_, D * 4 * H}, x.options());
  const at::Tensor lens = present(lengths) ? lengths->contiguous() : at::Tensor();
  const int64_t* lens_ptr = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  const at::Tensor c0c = present(c0) ? c0->contiguous() : at::Tensor();
  const at::Tensor h0c = present(h0) ? h0->contiguous() : at::Tensor();

  at::Tensor h_prev;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmsc::lstm_bwd", [&] {
    backward_loop<scalar_t>(s, w_hh, lens_ptr, c0c.defined() ? c0c.data_ptr<scalar_t>() : nullptr,
                            dout.defined() ? dout.data_ptr<scalar_t>() : nullptr, gates.data_ptr<scalar_t>(),
                            cells.data_ptr<scalar_t>(), need_dstate, dgates.data_ptr<scalar_t>(),
                            dh_state.data_ptr<scalar_t>(), dh_rec.data_ptr<scalar_t>(), dc_state.data_ptr<scalar_t>());
    if (need_dweights) {
      h_prev = at::empty({B, T_, D * H}, x.options());
      fill_h_prev<scalar_t>(s, lens_ptr, out.data_ptr<scalar_t>(), h0c.defined() ? h0c.data_ptr<scalar_t>() : nullptr,
                            h_prev.data_ptr<scalar_t>());
    }
  });

  return finish_backward(s, x, w_ih, dgates, h_prev, std::move(dh_state), std::move(dc_state), has_bias, need_dx,
                         need_dweights, need_dstate);
}

}  // namespace
}  // namespace fastmsc

TORCH_LIBRARY(fastmsc, m) {
  m.def(
      "lstm_fwd(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? h0, Tensor? c0, Tensor? lengths, "
      "bool training) -> (Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_bwd(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, Tensor w_hh, "
      "bool has_bias, Tensor? h0, Tensor? c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cells, "
      "bool need_dx, bool need_dweights, bool need_dstate) -> "
      "(Tensor dx, Tensor dw_ih, Tensor dw_hh, Tensor dbias, Tensor dh0, Tensor dc0)");
}

TORCH_LIBRARY_IMPL(fastmsc, CPU, m) {
  m.impl("lstm_fwd", &fastmsc::lstm_fwd_cpu);
  m.impl("lstm_bwd", &fastmsc::lstm_bwd_cpu);
}
