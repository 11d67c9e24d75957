// Argument checks and sizes shared by the CPU and CUDA implementations of fastmsc::lstm_fwd/lstm_bwd.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <tuple>
#include <utility>

namespace fastmsc {

struct LstmSizes {
  int64_t batch, steps, input, hidden, directions;
  // Size of the hidden state h: the projection size P with w_hr (torch.nn.LSTM's proj_size), else hidden.
  int64_t proj;
  bool projected;
};

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Shapes: x (B, T, I); w_ih (D*4H, I), both directions stacked; w_hh (D, 4H, R); bias (D*4H) =
// b_ih + b_hh; h0 (D, B, R), c0 (D, B, H); lengths (B,) int64 on x's device; w_hr (D, P, H) or absent.
// R = P with the projection w_hr (h_t = w_hr · (o ⊙ tanh(c_t))), R = H without.
inline LstmSizes check_lstm_args(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h0,
                                 const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
                                 const c10::optional<at::Tensor>& w_hr) {
  const bool projected = present(w_hr);
  TORCH_CHECK(x.dim() == 3, "fastmsc::lstm: x must be 3-D (batch, time, input), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastmsc::lstm: x must be float32 or float64 (half types are cast by the Python wrapper), got ",
              x.scalar_type());
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
    same(*bias, "bias");
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

// A copy of state (D, B, size) to update in place, or zeros.
inline at::Tensor state_or_zeros(const c10::optional<at::Tensor>& state, const LstmSizes& s, int64_t size,
                                 const at::Tensor& like) {
  if (present(state)) return state->contiguous().clone();
  return at::zeros({s.directions, s.batch, size}, like.options());
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

using LstmGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// After the BPTT loop, on either device: dx and the weight gradients as a few large GEMMs over every step.
// dgates (B, T, D*4H) gradients of the gate pre-activations; h_prev (B, T, D*R) the hidden state each step started
// from. With the projection: dh (B, T, D*P) the gradient reaching each step's h, and hidden (B, T, D*H) the
// unprojected o ⊙ tanh(c) it was projected from (both zero at padded steps), so dW_hr = dhᵀ · hidden.
// Returns (dx, dw_ih, dw_hh, dbias, dh0, dc0, dw_hr), an empty tensor for each gradient not asked for.
inline LstmGrads finish_backward(const LstmSizes& s, const at::Tensor& x, const at::Tensor& w_ih,
                                 const at::Tensor& dgates, const at::Tensor& h_prev, at::Tensor dh_state,
                                 at::Tensor dc_state, bool has_bias, bool need_dx, bool need_dweights,
                                 bool need_dstate, const at::Tensor& dh = at::Tensor(),
                                 const at::Tensor& hidden = at::Tensor()) {
  const int64_t N = s.batch * s.steps, D = s.directions, H = s.hidden, G = 4 * H, R = s.proj;
  const at::Tensor empty = at::empty({0}, x.options());
  const at::Tensor dg2d = dgates.view({N, D * G});
  at::Tensor dx = need_dx ? at::mm(dg2d, w_ih).view({s.batch, s.steps, s.input}) : empty;
  at::Tensor dw_ih = empty, dw_hh = empty, dbias = empty, dw_hr = empty;
  if (need_dweights) {
    dw_ih = at::mm(dg2d.t(), x.view({N, s.input}));
    dw_hh = at::empty({D, G, R}, x.options());
    const at::Tensor h_prev2d = h_prev.view({N, D * R});
    for (int64_t d = 0; d < D; ++d) {
      at::Tensor dw_d = dw_hh.select(0, d);
      at::mm_out(dw_d, dg2d.narrow(1, d * G, G).t(), h_prev2d.narrow(1, d * R, R));
    }
    if (has_bias) dbias = dg2d.sum(0);
    if (s.projected) {
      dw_hr = at::empty({D, R, H}, x.options());
      const at::Tensor dh2d = dh.view({N, D * R}), hidden2d = hidden.view({N, D * H});
      for (int64_t d = 0; d < D; ++d) {
        at::Tensor dw_d = dw_hr.select(0, d);
        at::mm_out(dw_d, dh2d.narrow(1, d * R, R).t(), hidden2d.narrow(1, d * H, H));
      }
    }
  }
  if (!need_dstate) {
    dh_state = empty;
    dc_state = empty;
  }
  return {dx, dw_ih, dw_hh, dbias, dh_state, dc_state, dw_hr};
}

}  // namespace fastmsc
