// The host side of fastmsc::lstm_fwd/lstm_bwd, shared by the CPU and CUDA implementations: argument checks, sizes,
// buffers, the GEMMs around the recurrence and the op entry points. Each backend adds only its recurrence loops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

namespace fastmsc {

struct LstmSizes {
  int64_t batch, steps, input, hidden, directions;
  // Size of the hidden state h: the projection size P with w_hr (torch.nn.LSTM's proj_size), else hidden.
  int64_t proj;
  bool projected;
};

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// How a backend allocates the op's large tensors (outputs, saved activations, gradients); at::empty on CUDA.
using EmptyFn = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor plain_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// Shapes: x (B, T, I); w_ih (D*4H, I), both directions stacked; w_hh (D, 4H, R); bias (D*4H) =
// b_ih + b_hh; h0 (D, B, R), c0 (D, B, H); lengths (B,) int64 on x's device; w_hr (D, P, H) or absent.
// R = P with the projection w_hr (h_t = w_hr · (o ⊙ tanh(c_t))), R = H without.
inline LstmSizes check_lstm_args(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0,
                                 const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
                                 const c10::optional<at::Tensor>& w_hr, bool bfloat16 = false) {
  const bool projected = present(w_hr);
  TORCH_CHECK(x.dim() == 3, "fastmsc::lstm: x must be 3-D (batch, time, input), got shape ", x.sizes());
  if (bfloat16) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fastmsc::lstm_fwd_bf16: x must be bfloat16, got ",
                x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "fastmsc::lstm: x must be float32 or float64 (half types are cast by the Python wrapper), got ",
                x.scalar_type());
  }
  if (projected) {
    TORCH_CHECK(w_hh.dim() == 3 && (w_hh.size(0) == 1 || w_hh.size(0) == 2) && w_hh.size(1) % 4 == 0 &&
                    w_hh.size(1) > 0 && w_hh.size(2) > 0,
                "fastmsc::lstm: w_hh must have shape (directions in {1, 2}, 4*hidden, proj size) with w_hr, got ",
                w_hh.sizes());
    TORCH_CHECK(w_hr->dim() == 3 && w_hr->size(0) == w_hh.size(0) && w_hr->size(1) == w_hh.size(2) &&
                    w_hr->size(2) == w_hh.size(1) / 4,
                "fastmsc::lstm: w_hr must have shape (", w_hh.size(0), ", ", w_hh.size(2), ", ", w_hh.size(1) / 4,
                ") (directions, proj size, hidden), got ", w_hr->sizes());
  } else {
    TORCH_CHECK(w_hh.dim() == 3 && (w_hh.size(0) == 1 || w_hh.size(0) == 2) &&
                    w_hh.size(1) == 4 * w_hh.size(2) && w_hh.size(2) > 0,
                "fastmsc::lstm: w_hh must have shape (directions in {1, 2}, 4*hidden, hidden), got ", w_hh.sizes());
  }
  LstmSizes s{x.size(0), x.size(1), x.size(2), w_hh.size(1) / 4, w_hh.size(0), w_hh.size(2), projected};
  TORCH_CHECK(s.steps > 0, "fastmsc::lstm: x must have at least one time step, got shape ", x.sizes());
  const int64_t gates = s.directions * 4 * s.hidden;
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == gates && w_ih.size(1) == s.input,
              "fastmsc::lstm: w_ih must have shape (", gates, ", ", s.input, ") (directions*4*hidden, input), got ",
              w_ih.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "fastmsc::lstm: ", name, " is on ", t.device(), " but x is on ",
                x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastmsc::lstm: ", name, " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type());
  };
  same(w_ih, "w_ih");
  same(w_hh, "w_hh");
  if (projected) same(*w_hr, "w_hr");
  if (present(bias)) {
    if (bfloat16) {  // b_ih + b_hh summed unrounded
      TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == at::kFloat,
                  "fastmsc::lstm_fwd_bf16: bias must be float32 on x's device, got ", bias->scalar_type(), " on ",
                  bias->device());
    } else {
      same(*bias, "bias");
    }
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == gates, "fastmsc::lstm: bias must have shape (", gates,
                ",), got ", bias->sizes());
  }
  struct State {
    const c10::optional<at::Tensor>* tensor;
    const char* name;
    int64_t size;
    const char* what;
  };
  for (const State& state : {State{&h0, "h0", s.proj, projected ? "proj size" : "hidden"},
                             State{&c0, "c0", s.hidden, "hidden"}}) {
    if (present(*state.tensor)) {
      const at::Tensor& t = **state.tensor;
      same(t, state.name);
      TORCH_CHECK(t.dim() == 3 && t.size(0) == s.directions && t.size(1) == s.batch && t.size(2) == state.size,
                  "fastmsc::lstm: ", state.name, " must have shape (", s.directions, ", ", s.batch, ", ", state.size,
                  ") (directions, batch, ", state.what, "), got ", t.sizes());
    }
  }
  if (present(lengths)) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == s.batch,
                "fastmsc::lstm: lengths must be an int64 tensor of shape (", s.batch, ",), got ",
                lengths->scalar_type(), " of shape ", lengths->sizes());
    TORCH_CHECK(lengths->device() == x.device(), "fastmsc::lstm: lengths is on ", lengths->device(),
                " but x is on ", x.device());
  }
  return s;
}

// A raw pointer to the data of a tensor that is undefined where its argument was absent: the kernels take null.
template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// A copy of state (D, B, size) to update in place, or zeros.
inline at::Tensor state_or_zeros(const c10::optional<at::Tensor>& state, const LstmSizes& s, int64_t size,
                                 const at::TensorOptions& options) {
  if (!present(state)) return at::zeros({s.directions, s.batch, size}, options);
  if (state->scalar_type() != options.dtype().toScalarType()) return state->to(options.dtype()).contiguous();
  return state->contiguous().clone();
}

// The input projections of every step and both directions as one GEMM: (B, T, D*4H) = x · w_ihᵀ (+ bias).
// x contiguous (B, T, I); the result is the buffer the recurrence adds its per-step GEMM into.
inline at::Tensor input_projection(const LstmSizes& s, const at::Tensor& x, const at::Tensor& w_ih,
                                   const c10::optional<at::Tensor>& bias) {
  const int64_t rows = s.batch * s.steps, cols = s.directions * 4 * s.hidden;
  at::Tensor xproj = at::empty({s.batch, s.steps, cols}, x.options());
  at::Tensor xproj2d = xproj.view({rows, cols});
  if (present(bias)) {
    at::addmm_out(xproj2d, *bias, x.view({rows, s.input}), w_ih.t());
  } else {
    at::mm_out(xproj2d, x.view({rows, s.input}), w_ih.t());
  }
  return xproj;
}

// Row order of the (B, T, features) tensors. A time-major sequence (torch.nn.LSTM's default layout) reaches the op as
// a transposed view, x (B, T, I) with the batch rows adjacent in memory; a backend that follows that order reads it
// in place and writes out, the saved gates and cells and dx in the same order, so that the caller's transpose back
// gives contiguous tensors (as torch.nn.LSTM returns) and no copy is made either way.
inline bool is_time_major(const at::Tensor& x) { return x.size(0) > 1 && x.size(1) > 1 && x.stride(0) < x.stride(1); }

// t (B, T, F) dense in the given order (no copy where it already is).
inline at::Tensor in_order(const at::Tensor& t, bool time_major) {
  return time_major ? t.transpose(0, 1).contiguous().transpose(0, 1) : t.contiguous();
}

inline at::Tensor empty_in_order(EmptyFn empty, int64_t B, int64_t T, int64_t F, const at::TensorOptions& options,
                                 bool time_major) {
  return time_major ? empty({T, B, F}, options).transpose(0, 1) : empty({B, T, F}, options);
}

// t (B, T, F) dense in either order as the (B*T, F) matrix of its rows in memory order.
inline at::Tensor memory_rows(const at::Tensor& t) {
  const at::Tensor rows = t.is_contiguous() ? t : t.transpose(0, 1);
  return rows.view({t.size(0) * t.size(1), t.size(2)});
}

// The tensors of one forward call that both devices allocate alike; each backend adds its own gate buffer.
struct LstmForward {
  bool time_major;           // x, out and cells in time-major order (see is_time_major), else batch-first
  at::Tensor x, w_hh, lens;  // dense; lens undefined without lengths
  at::Tensor out, h_n, c_n;  // (B, T, D*R); the final states, started from h0/c0 (or zeros) and updated in place
  at::Tensor cells;          // (B, T, D*H) for the backward when training, else empty
};

// Called once the arguments are checked and the device guard is set. follow_time_major: the backend reads and writes
// time-major rows in place.
inline LstmForward prepare_forward(const LstmSizes& s, const at::Tensor& x_in, const at::Tensor& w_hh_in,
                                   const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
                                   const c10::optional<at::Tensor>& lengths, bool training, EmptyFn empty,
                                   bool follow_time_major) {
  LstmForward f;
  f.time_major = follow_time_major && is_time_major(x_in);
  f.x = in_order(x_in, f.time_major);
  f.w_hh = w_hh_in.contiguous();
  f.lens = present(lengths) ? lengths->contiguous() : at::Tensor();
  const at::TensorOptions options = f.x.options();
  f.out = empty_in_order(empty, s.batch, s.steps, s.directions * s.proj, options, f.time_major);
  f.h_n = state_or_zeros(h0, s, s.proj, f.x.options());
  f.c_n = state_or_zeros(c0, s, s.hidden, f.x.options());
  f.cells = training ? empty_in_order(empty, s.batch, s.steps, s.directions * s.hidden, options, f.time_major)
                     : at::empty({0}, options);
  return f;
}

// One backward call's inputs and buffers, host-side and the same on both devices; the backend runs the BPTT loop
// over them (adding its own per-step scratch), then fills h_prev and unprojected, and finish_backward turns the
// result into the gradients.
struct LstmBackward {
  LstmSizes s;
  EmptyFn empty;
  bool time_major;  // the order (see is_time_major) of x, out, gates, cells, dout and of every (B, T, ·) buffer below
  bool has_bias, need_dx, need_dweights, need_dstate;
  at::Tensor w_ih;  // as given: only the GEMMs after the loop read it
  // Contiguous; w_hr, dout, lens, h0 and c0 undefined where absent.
  at::Tensor x, w_hh, w_hr, out, gates, cells, dout, lens, h0, c0;
  // dh_state (D, B, R) and dc_state (D, B, H): the gradients carried along the recurrence, those of h_n and c_n on
  // entry (zeros where absent), those of h0 and c0 on exit. dh_rec (D, B, R): each step's dG · w_hh.
  at::Tensor dh_state, dc_state, dh_rec;
  at::Tensor dgates;  // (B, T, D*4H), the gate pre-activation gradients of every step
  // With the projection only: dh_all (B, T, D*P) the gradient reaching each step's h (zero at padded steps), the
  // left factor of dW_hr, and dr (D, B, H) one step's image of it through w_hr.
  at::Tensor dh_all, dr;
  // The right factors of dW_hh and dW_hr; see allocate_weight_inputs.
  at::Tensor h_prev, unprojected;
  // dx (B, T, I), dw_ih (D*4H, I), dw_hh (D, 4H, R) and dbias (D*4H) where the backend computed them itself;
  // finish_backward computes those left undefined.
  at::Tensor dx, dw_ih, dw_hh, dbias;
};

// Called once the arguments are checked and the device guard is set; checks the shapes of what the training forward
// saved.
inline LstmBackward prepare_backward(const LstmSizes& s, const c10::optional<at::Tensor>& grad_out,
                                     const c10::optional<at::Tensor>& grad_h_n,
                                     const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& x_in,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh_in, bool has_bias,
                                     const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& out_in,
                                     const at::Tensor& gates_in, const at::Tensor& cells_in, bool need_dx,
                                     bool need_dweights, bool need_dstate, const c10::optional<at::Tensor>& w_hr_in,
                                     EmptyFn empty, bool follow_time_major,
                                     c10::optional<at::ScalarType> work = c10::nullopt, bool gate_gradients = true) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, R = s.proj;
  // The saved state and the output gradients in x's dtype and on its device (the loops read their memory as such).
  auto like_x = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x_in.scalar_type() && t.device() == x_in.device(), "fastmsc::lstm_bwd: ", name,
                " must be ", x_in.scalar_type(), " on ", x_in.device(), " as x is, got ", t.scalar_type(), " on ",
                t.device());
  };
  like_x(out_in, "out");
  like_x(gates_in, "gates");
  like_x(cells_in, "cells");
  if (present(grad_out)) like_x(*grad_out, "grad_out");
  if (present(grad_h_n)) like_x(*grad_h_n, "grad_h_n");
  if (present(grad_c_n)) like_x(*grad_c_n, "grad_c_n");
  const std::vector<int64_t> out_shape{B, T_, D * R}, cells_shape{B, T_, D * H};
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(out_shape) && cells_in.sizes() == at::IntArrayRef(cells_shape),
              "fastmsc::lstm_bwd: out and cells must have shapes ", at::IntArrayRef(out_shape), " and ",
              at::IntArrayRef(cells_shape), ", got ", out_in.sizes(), " and ", cells_in.sizes(),
              " (was the forward run with training=True?)");
  TORCH_CHECK(gates_in.sizes() == at::IntArrayRef({B, T_, D * 4 * H}), "fastmsc::lstm_bwd: gates must have shape (",
              B, ", ", T_, ", ", D * 4 * H, "), got ", gates_in.sizes());
  LstmBackward bw;
  bw.s = s;
  bw.has_bias = has_bias;
  bw.need_dx = need_dx;
  bw.need_dweights = need_dweights;
  bw.need_dstate = need_dstate;
  bw.w_ih = w_ih;
  // The forward's row order, which its saved gates keep: x may come in another layout (a traced graph may hand over
  // a contiguous copy of a time-major x), and taking its order would sum the weight gradients over rows in another
  // order than the eager backward, a different rounding.
  const bool tm = bw.time_major = follow_time_major && is_time_major(gates_in);
  bw.x = in_order(x_in, tm);
  bw.w_hh = w_hh_in.contiguous();
  bw.out = in_order(out_in, tm);
  bw.gates = in_order(gates_in, tm);
  bw.cells = in_order(cells_in, tm);
  bw.w_hr = s.projected ? w_hr_in->contiguous() : at::Tensor();
  bw.dout = present(grad_out) ? in_order(*grad_out, tm) : at::Tensor();
  if (bw.dout.defined()) {
    TORCH_CHECK(bw.dout.sizes() == bw.out.sizes(), "fastmsc::lstm_bwd: grad_out must have shape ", bw.out.sizes(),
                ", got ", bw.dout.sizes());
  }
  bw.lens = present(lengths) ? lengths->contiguous() : at::Tensor();
  bw.h0 = present(h0) ? h0->contiguous() : at::Tensor();
  bw.c0 = present(c0) ? c0->contiguous() : at::Tensor();
  // The gradients' dtype: x's, or ``work`` (float32 for the bf16 backward).
  const at::TensorOptions options = bw.x.options().dtype(work.value_or(x_in.scalar_type()));
  bw.dh_state = state_or_zeros(grad_h_n, s, R, options);
  bw.dc_state = state_or_zeros(grad_c_n, s, H, options);
  bw.dh_rec = at::empty({D, B, R}, options);
  bw.empty = empty;
  // The gate gradients' buffer, unless the backend brings its own.
  if (gate_gradients) bw.dgates = empty_in_order(empty, B, T_, D * 4 * H, options, tm);
  bw.dh_all = s.projected ? empty_in_order(empty, B, T_, D * R, options, tm) : at::Tensor();
  bw.dr = s.projected ? at::empty({D, B, H}, options) : at::Tensor();
  return bw;
}

// h_prev (B, T, D*R), the hidden state each step's recurrent GEMM used, and with the projection unprojected
// (B, T, D*H), the o ⊙ tanh(c) each step projected; both zero at padded steps. Allocated only after the BPTT loop,
// and only when weight gradients are asked for, so that they hold no memory during the loop.
inline void allocate_weight_inputs(LstmBackward& bw) {
  const LstmSizes& s = bw.s;
  bw.h_prev = empty_in_order(bw.empty, s.batch, s.steps, s.directions * s.proj, bw.x.options(), bw.time_major);
  if (s.projected) {
    bw.unprojected = empty_in_order(bw.empty, s.batch, s.steps, s.directions * s.hidden, bw.x.options(), bw.time_major);
  }
}

using LstmGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// After the BPTT loop, on either device: dx and the weight gradients as a few large GEMMs over every step, from
// dgates, h_prev and, with the projection, dh_all and unprojected (dW_hr = dh_allᵀ · unprojected).
// Returns (dx, dw_ih, dw_hh, dbias, dh0, dc0, dw_hr), an empty tensor for each gradient not asked for.
inline LstmGrads finish_backward(LstmBackward& bw) {
  const LstmSizes& s = bw.s;
  const int64_t D = s.directions, H = s.hidden, G = 4 * H, R = s.proj;
  // An empty batch skips the loop and fills nothing: the GEMMs over zero rows give zero weight gradients.
  if (s.batch == 0 && bw.need_dweights && !bw.h_prev.defined()) allocate_weight_inputs(bw);
  const at::Tensor& x = bw.x;
  // A gradient not asked for: an empty tensor of its own (outputs of an op must not alias one another).
  auto none = [&] { return at::empty({0}, x.options()); };
  // Every (B, T, ·) tensor here is dense in bw's order: their memory rows pair up in the products over B*T.
  const at::Tensor dg2d = memory_rows(bw.dgates);
  auto as_sequence = [&](const at::Tensor& rows) {  // (B*T, F) in memory order -> (B, T, F)
    return bw.time_major ? rows.view({s.steps, s.batch, rows.size(1)}).transpose(0, 1)
                         : rows.view({s.batch, s.steps, rows.size(1)});
  };
  at::Tensor dx = !bw.need_dx ? none() : bw.dx.defined() ? bw.dx : as_sequence(at::mm(dg2d, bw.w_ih));
  at::Tensor dw_ih = none(), dw_hh = none(), dbias = none(), dw_hr = none();
  if (bw.need_dweights) {
    dw_ih = bw.dw_ih.defined() ? bw.dw_ih : at::mm(dg2d.t(), memory_rows(x));
    if (bw.dw_hh.defined()) {
      dw_hh = bw.dw_hh;
    } else {
      dw_hh = at::empty({D, G, R}, x.options());
      const at::Tensor h_prev2d = memory_rows(bw.h_prev);
      for (int64_t d = 0; d < D; ++d) {
        at::Tensor dw_d = dw_hh.select(0, d);
        at::mm_out(dw_d, dg2d.narrow(1, d * G, G).t(), h_prev2d.narrow(1, d * R, R));
      }
    }
    if (bw.has_bias) dbias = bw.dbias.defined() ? bw.dbias : dg2d.sum(0);
    if (s.projected) {
      dw_hr = at::empty({D, R, H}, x.options());
      const at::Tensor dh2d = memory_rows(bw.dh_all), hidden2d = memory_rows(bw.unprojected);
      for (int64_t d = 0; d < D; ++d) {
        at::Tensor dw_d = dw_hr.select(0, d);
        at::mm_out(dw_d, dh2d.narrow(1, d * R, R).t(), hidden2d.narrow(1, d * H, H));
      }
    }
  }
  at::Tensor dh0 = bw.need_dstate ? std::move(bw.dh_state) : none();
  at::Tensor dc0 = bw.need_dstate ? std::move(bw.dc_state) : none();
  return {dx, dw_ih, dw_hh, dbias, dh0, dc0, dw_hr};
}

// The entry points of the ops fastmsc::lstm_fwd and fastmsc::lstm_bwd (schemas in lstm_cpu.cpp), one template for
// both devices so that the argument checks, buffers and gradient bookkeeping cannot drift apart. Backend supplies:
//   Guard: constructed from x's device once the checks have confirmed every tensor is on it;
//   empty(sizes, options): allocates the large tensors (an EmptyFn);
//   reads_time_major(s, dtype): whether this call's loops follow a time-major x in place (see is_time_major);
//   kReturnsTimeMajor: out, gates, cells and dx follow a time-major x in any case (a copy where the loops did not);
//   forward(s, f, w_ih, bias, h0, training, w_hr): runs the layer into f and returns the saved gates (empty when
//     not training);
//   backward(bw): the BPTT loop into bw's buffers, then h_prev and unprojected when bw.need_dweights.
// backward is skipped for an empty batch; forward is not, and must return without computing (or launching) anything.
struct NoDeviceGuard {
  explicit NoDeviceGuard(const c10::Device&) {}
};

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
    const c10::optional<at::Tensor>& lengths, bool training, const c10::optional<at::Tensor>& w_hr) {
  const LstmSizes s = check_lstm_args(x, w_ih, w_hh, bias, h0, c0, lengths, w_hr);
  const typename Backend::Guard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  LstmForward f = prepare_forward(s, x, w_hh, h0, c0, lengths, training, &Backend::empty,
                                  Backend::reads_time_major(s, x.scalar_type()));
  at::Tensor gates = Backend::forward(s, f, w_ih, bias, h0, training, w_hr);
  if (Backend::kReturnsTimeMajor && is_time_major(x) && !f.time_major) {
    // The same layout whichever code ran (the fake implementation promises it): a copy where it ran batch-first.
    return {in_order(f.out, true), f.h_n, f.c_n, training ? in_order(gates, true) : gates,
            training ? in_order(f.cells, true) : f.cells};
  }
  return {f.out, f.h_n, f.c_n, gates, f.cells};
}

template <typename Backend>
LstmGrads lstm_bwd(const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& grad_h_n,
                   const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& x, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, bool has_bias, const c10::optional<at::Tensor>& h0,
                   const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
                   const at::Tensor& out, const at::Tensor& gates, const at::Tensor& cells, bool need_dx,
                   bool need_dweights, bool need_dstate, const c10::optional<at::Tensor>& w_hr) {
  const LstmSizes s = check_lstm_args(x, w_ih, w_hh, c10::nullopt, h0, c0, lengths, w_hr);
  const typename Backend::Guard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  LstmBackward bw = prepare_backward(s, grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out,
                                     gates, cells, need_dx, need_dweights, need_dstate, w_hr, &Backend::empty,
                                     Backend::reads_time_major(s, x.scalar_type()));
  // An empty batch has no step to run (and a CUDA kernel must not be launched with an empty grid); the GEMMs over
  // zero rows still give the zero weight gradients.
  if (s.batch != 0) Backend::backward(bw);
  LstmGrads grads = finish_backward(bw);
  // dx in x's layout, as the fake implementation promises, whichever order the loops ran in.
  if (Backend::kReturnsTimeMajor && need_dx) std::get<0>(grads) = in_order(std::get<0>(grads), is_time_major(x));
  return grads;
}

}  // namespace fastmsc
