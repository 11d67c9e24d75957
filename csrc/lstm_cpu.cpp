// fastmsc::lstm_fwd / fastmsc::lstm_bwd: op schemas and the CPU implementation of one (bi)directional
// LSTM layer, batch first.
//
// Forward: the steps are processed in chunks of about 256 (step, batch) rows. Per chunk each direction
// projects its inputs with one GEMM into a small buffer that stays in cache (x @ w_ih^T); per step it adds
// h_prev @ w_hh^T (weights packed once per call, see PackedWeightGemm) and one vectorised pass adds the
// bias and turns the pre-activations into c and h (training also stores the activated gates and c for
// the backward).
// The two directions are independent recurrences and run on two threads.
// With a projection (w_hr, torch.nn.LSTM's proj_size) the pass writes o * tanh(c) to a scratch buffer and one
// more GEMM per step projects it to h = (o * tanh(c)) @ w_hr^T.
// Backward: BPTT with one pass per step (gate gradients dG) and the recurrent GEMM dh = dG @ w_hh;
// dW_ih = dG^T x, dW_hh = dG^T h_prev, the bias gradient and dx are a few large GEMMs after the loop. With a
// projection each step first sums the gradient reaching h (kept for dW_hr = dh^T (o * tanh(c)), whose right
// factor is recomputed from the saved gates and cells) and maps it back through w_hr with one GEMM.
// On x86 the float32 layers without projection run the vectorised recurrence of lstm_cpu_panels.h instead, and on
// CPUs with AVX512_BF16 the bf16 layers have ops of their own (lstm_fwd_bf16, lstm_bwd_bf16) on bf16 products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__has_include)
#if __has_include(<dlfcn.h>)
#include <dlfcn.h>
#define FASTMSC_HAVE_DLFCN 1
#endif
#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif
#endif
#ifndef FASTMSC_HAVE_DLFCN
#define FASTMSC_HAVE_DLFCN 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

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
// no-tree-pre: GCC's partial redundancy elimination turns the clamps in exp_vectorizable into branches
// (it threads the clamped, constant case around the polynomial), after which the loops are no longer
// vectorised at AVX2 width (only AVX-512's masks recovered them): without it the AVX2 variant runs the
// gate math one float at a time.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTMSC_VECTORIZABLE __attribute__((optimize("no-tree-pre")))
#else
#define FASTMSC_VECTORIZABLE
#endif
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTMSC_NO_TARGET_CLONES)
#define FASTMSC_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4"))) FASTMSC_VECTORIZABLE
#else
#define FASTMSC_CLONES FASTMSC_VECTORIZABLE
#endif

namespace fastmsc {
namespace {

// ---------------------------------------------------------------------------------------------------
// Pointwise row kernels: one batch row, H hidden units. Separate restrict pointers per gate block so
// the compiler sees no aliasing and vectorises without runtime checks.

// A row of 4H values split into its gate blocks i, f, g, o.
template <typename P>
struct GateBlocks {
  P i, f, g, o;
};

template <typename T>
FASTMSC_HD GateBlocks<T* __restrict> gate_blocks(T* row, int64_t H) {
  return {row, row + H, row + 2 * H, row + 3 * H};
}

// z: the row's gate pre-activations without the bias (4 blocks of H). Training also stores the activated
// gates (act, 4 blocks of H) and the cell state (c_out) for the backward. kProj: o * tanh(c) goes to h_state
// only (a scratch row the projection GEMM reads; h_out is unused), not yet the layer's output.
template <typename T, bool kTrain, bool kProj>
FASTMSC_HD void forward_row(const T* __restrict z, const T* __restrict bias, T* __restrict c_state,
                            T* __restrict h_state, T* __restrict h_out, T* __restrict c_out, T* __restrict act,
                            int64_t H) {
  const auto [zi, zf, zg, zo] = gate_blocks(z, H);
  const auto [bi, bf, bg, bo] = gate_blocks(bias, H);
  const auto [ai, af, ag, ao] = gate_blocks(act, H);
#pragma GCC ivdep
  for (int64_t j = 0; j < H; ++j) {
    T i, f, g, o, c, h;
    cell_forward(zi[j] + bi[j], zf[j] + bf[j], zg[j] + bg[j], zo[j] + bo[j], c_state[j], i, f, g, o, c, h);
    if constexpr (kTrain) {
      ai[j] = i;
      af[j] = f;
      ag[j] = g;
      ao[j] = o;
      c_out[j] = c;
    }
    c_state[j] = c;
    h_state[j] = h;
    if constexpr (!kProj) h_out[j] = h;
  }
}

template <typename T>
FASTMSC_HD void backward_row(const T* __restrict act, const T* __restrict c, const T* __restrict c_prev,
                             const T* __restrict dh_carry, const T* __restrict dout, T* __restrict dc_state,
                             T* __restrict dgates, int64_t H) {
  const auto [ai, af, ag, ao] = gate_blocks(act, H);
  const auto [di, df, dg, dq] = gate_blocks(dgates, H);
#pragma GCC ivdep
  for (int64_t j = 0; j < H; ++j) {
    T dc_prev;
    cell_backward(ai[j], af[j], ag[j], ao[j], c[j], c_prev[j], dh_carry[j] + dout[j], dc_state[j], di[j], df[j],
                  dg[j], dq[j], dc_prev);
    dc_state[j] = dc_prev;
  }
}

// The row kernels of one dtype, each compiled once per ISA variant, and Rows<T> to pick them by dtype.
template <typename T>
struct Rows;

#define FASTMSC_ROW_VARIANTS(T, SUFFIX, CLONES)                                                               \
  CLONES void forward_row_train_##SUFFIX(const T* z, const T* b, T* cs, T* hs, T* ho, T* co, T* act, int64_t H) { \
    forward_row<T, true, false>(z, b, cs, hs, ho, co, act, H);                                                \
  }                                                                                                           \
  CLONES void forward_row_infer_##SUFFIX(const T* z, const T* b, T* cs, T* hs, T* ho, T* co, T* act, int64_t H) { \
    forward_row<T, false, false>(z, b, cs, hs, ho, co, act, H);                                               \
  }                                                                                                           \
  CLONES void forward_row_train_proj_##SUFFIX(const T* z, const T* b, T* cs, T* hs, T* ho, T* co, T* act,      \
                                              int64_t H) {                                                    \
    forward_row<T, true, true>(z, b, cs, hs, ho, co, act, H);                                                 \
  }                                                                                                           \
  CLONES void forward_row_infer_proj_##SUFFIX(const T* z, const T* b, T* cs, T* hs, T* ho, T* co, T* act,      \
                                              int64_t H) {                                                    \
    forward_row<T, false, true>(z, b, cs, hs, ho, co, act, H);                                                \
  }                                                                                                           \
  CLONES void backward_row_##SUFFIX(const T* act, const T* c, const T* cp, const T* dh, const T* dout, T* dc, \
                                    T* dgates, int64_t H) {                                                   \
    backward_row<T>(act, c, cp, dh, dout, dc, dgates, H);                                                     \
  }                                                                                                           \
  template <>                                                                                                 \
  struct Rows<T> {                                                                                            \
    static constexpr auto fwd_train = forward_row_train_##SUFFIX;                                             \
    static constexpr auto fwd_infer = forward_row_infer_##SUFFIX;                                             \
    static constexpr auto fwd_train_proj = forward_row_train_proj_##SUFFIX;                                   \
    static constexpr auto fwd_infer_proj = forward_row_infer_proj_##SUFFIX;                                   \
    static constexpr auto bwd = backward_row_##SUFFIX;                                                        \
  };

FASTMSC_ROW_VARIANTS(float, f32, FASTMSC_CLONES)
FASTMSC_ROW_VARIANTS(double, f64, )  // float64 is the checking dtype: exp is libm's, no variants needed

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

// ---------------------------------------------------------------------------------------------------
// MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute). A plain sgemm re-packs the weight operand
// into its blocked layout on every call; the recurrence multiplies by the same w_hh at every step, so
// packing it once per call and reusing it saves that copy T times (what oneDNN's RNN does too). The
// functions are looked up at run time in the libtorch_cpu already loaded: torch builds with MKL export
// them, builds on OpenBLAS or other BLAS do not, and the extension must not link MKL itself. MKL's LP64
// interface (32-bit integers) is the one torch links.
namespace mkl_packed {

enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };
using GetSizeFn = size_t (*)(int identifier, int m, int n, int k);
using PackFn = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                        int ld, float* dest);
using ComputeFn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, const float* a, int lda,
                           const float* b, int ldb, float beta, float* c, int ldc);

struct Api {
  GetSizeFn get_size = nullptr;
  PackFn pack = nullptr;
  ComputeFn compute = nullptr;
  bool available() const { return get_size != nullptr && pack != nullptr && compute != nullptr; }
};

inline Api resolve() {
  Api api;
#if FASTMSC_HAVE_DLFCN
  const char* off = std::getenv("FASTMSC_LSTM_PACKED_GEMM");
  if (off != nullptr && std::strcmp(off, "0") == 0) return api;  // to run (and test) the generic path
  // The library that holds torch's BLAS: found from the address of one of its functions, opened again
  // without loading anything (RTLD_NOLOAD) so that the lookup is confined to it and its dependencies.
  void* handle = nullptr;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) != 0 && info.dli_fname != nullptr) {
    handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
  }
  if (handle == nullptr) return api;
  api.get_size = reinterpret_cast<GetSizeFn>(dlsym(handle, "cblas_sgemm_pack_get_size"));
  api.pack = reinterpret_cast<PackFn>(dlsym(handle, "cblas_sgemm_pack"));
  api.compute = reinterpret_cast<ComputeFn>(dlsym(handle, "cblas_sgemm_compute"));
  // The handle stays open: the library is torch's own and outlives this extension anyway.
#endif
  return api;
}

inline const Api& api() {
  static const Api resolved = resolve();
  return resolved;
}

inline bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > std::numeric_limits<int>::max()) return false;
  }
  return true;
}

}  // namespace mkl_packed

// A GEMM of one loop that multiplies by the same weight every call (the recurrent product of each step, the
// input projection of each chunk): C (m x n, row stride ldc) = beta*C + A (m x k, row stride lda) @ op(W), W
// given row-major as (k x n), or as (n x k) with w_transposed. float with MKL available: W packed once at
// construction. Otherwise (float64, other BLAS): plain GEMMs.
template <typename T>
class PackedWeightGemm {
 public:
  PackedWeightGemm(int64_t m, int64_t n, int64_t k, const T* w, int64_t ldw, bool w_transposed, int64_t max_ldc)
      : m_(m), n_(n), k_(k), w_(w), ldw_(ldw), w_transposed_(w_transposed) {
    if constexpr (std::is_same_v<T, float>) {
      const auto& mkl = mkl_packed::api();
      if (mkl.available() && m > 0 && n > 0 && k > 0 && mkl_packed::fits_int({m, n, k, ldw, max_ldc})) {
        const size_t bytes = mkl.get_size(mkl_packed::kBMatrix, int(m), int(n), int(k));
        packed_ = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                            at::TensorOptions().dtype(at::kFloat));
        mkl.pack(mkl_packed::kRowMajor, mkl_packed::kBMatrix, w_transposed ? mkl_packed::kTrans : mkl_packed::kNoTrans,
                 int(m), int(n), int(k), 1.0f, w, int(ldw), packed_.data_ptr<float>());
      }
    }
  }

  void run(const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_.defined()) {
        mkl_packed::api().compute(mkl_packed::kRowMajor, mkl_packed::kNoTrans, mkl_packed::kPacked, int(m_), int(n_),
                                  int(k_), a, int(lda), packed_.data_ptr<float>(), int(ldw_), beta, c, int(ldc));
        return;
      }
    }
    gemm_rowmajor<T>(m_, n_, k_, a, lda, w_, ldw_, w_transposed_, beta, c, ldc);
  }

 private:
  int64_t m_, n_, k_;
  const T* w_;
  int64_t ldw_;
  bool w_transposed_;
  at::Tensor packed_;  // MKL's blocked copy of W, undefined when not packing
};

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
// The vectorised float32 recurrence (lstm_cpu_panels.h), without the projection (R = H). Strides are in floats:
// element (b, t, column) of x is x[b * x_sb + t * x_st + column], and likewise for the others.

struct PanelForward {
  int64_t batch, steps, input, hidden;
  int64_t panels;      // ceil(H / width): panel p holds the i, f, g, o columns of hidden units [p * width, + width)
  const float* x;      // (B, T, I)
  int64_t x_sb, x_st;
  const float* w_ih;   // (D, panels, I, 4 * width), pack_gate_panels
  const float* w_hh;   // (D, panels, H, 4 * width)
  const float* bias;   // (D, panels * 4 * width) or null
  const int64_t* lens;
  const float* h0;     // (D, B, H) or null
  float* out;          // (B, T, D * H)
  int64_t out_sb, out_st;
  float* h_n;          // (D, B, H)
  float* c_n;          // (D, B, H): c0 (or zeros) on entry
  float* gates;        // (B, T, D * 4H), the activated gates; training only, else null
  int64_t gates_sb, gates_st;
  float* cells;        // (B, T, D * H); training only
  int64_t cells_sb, cells_st;
  int64_t panel_threads = 1;  // threads sharing each row task's panels, a barrier per step (panel_threads_for)
};

// E: the element type of the saved state and of the output gradient, float32 or (bf16 layers, their bits) uint16_t;
// the gate gradients are computed in float32 either way. With E = uint16_t they go out rounded to bf16
// (dgates_rounded), which the recurrent product multiplies by w_hh's bf16 pairs, and dgates is unused. Where dbias_rows
// is given they are summed into it per row (before the rounding).
template <typename E>
struct PanelBackwardOf {
  int64_t batch, steps, hidden;
  int64_t panels;      // ceil(H / (4 * width))
  // w_hh's 4H rows are the product's K. Panel p of direction d starts at w_hh + d * w_hh_direction_stride +
  // p * w_hh_panel_stride, its rows w_hh_ld apart: packed by pack_column_panels, or w_hh (D, 4H, H) itself where H is a
  // whole number of panels; for bf16 state, pair panels (pack_pair_panels) held as 32-bit words.
  const float* w_hh;
  int64_t w_hh_ld, w_hh_panel_stride, w_hh_direction_stride;
  const int64_t* lens;
  const E* c0;         // (D, B, H) or null
  const E* dout;       // (B, T, D * H) or null
  int64_t dout_sb, dout_st;
  const E* gates;      // as the forward saved them
  int64_t gates_sb, gates_st;
  const E* cells;
  int64_t cells_sb, cells_st;
  float* dgates;       // (B, T, D * 4H), written (float32 state)
  int64_t dgates_sb, dgates_st;  // of dgates or dgates_rounded
  float* dh_state;     // (D, B, H): the h_n gradient on entry, the h0 gradient on exit
  float* dc_state;     // (D, B, H): likewise for c
  bool need_dstate;
  uint16_t* dgates_rounded;  // (B, T, D * 4H) bf16, written (bf16 state); else null
  float* dbias_rows;         // (D, B, 4H): each row's gate gradients summed over its steps, added to; or null
  int64_t panel_threads = 1;  // threads sharing each row task's panels, a barrier per step (panel_threads_for)
};
using PanelBackward = PanelBackwardOf<float>;

// C (m x n, row stride ldc) = A · B, or C += A · B with accumulate; A(r, k) = a[r * a_rs + k * a_ks], so a transposed
// A is a stride swap. B (k x n): packed by pack_column_panels (ldb = 0), or read in place, row-major with row stride ldb,
// where n is a whole number of panels.
struct PanelGemm {
  int64_t m, n, k;
  const float* a;
  int64_t a_rs, a_ks;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  bool accumulate;
};

// The bf16 backward's products (AVX512_BF16): C (m x n float32, row stride ldc) = A · B, or C += A · B with
// accumulate, over k = 2 * pairs (an odd k's last pair holds a zero partner). Both factors hold pairs along k in 32-bit
// words, the earlier k in the low half: A's pair kp of row r is the word a[r * a_rs + kp * a_ks]; B is packed by
// pack_pair_panels, (ceil(n / 64), pairs, 64) words, zero past n.
struct PairGemm {
  int64_t m, n, k;  // k: pairs
  const uint32_t* a;
  int64_t a_rs, a_ks;
  const uint32_t* b;
  float* c;
  int64_t ldc;
  bool accumulate;
};

// The bfloat16 forward's arguments (lstm_cpu_panels.h, AVX512_BF16): as PanelForward, with bf16 tensors (their bits),
// weights packed as bf16 pairs (pack_gate_panels_bf16) and a float32 bias; h0, c0 (D, B, H) bf16 or null.
struct PanelForwardBf16 {
  int64_t batch, steps, input, hidden, panels;
  const uint16_t* x;
  int64_t x_sb, x_st;
  const uint16_t* w_ih;
  const uint16_t* w_hh;
  const float* bias;
  const int64_t* lens;
  const uint16_t* h0;
  const uint16_t* c0;
  uint16_t* out;
  int64_t out_sb, out_st;
  uint16_t* h_n;
  uint16_t* c_n;
  uint16_t* gates;
  int64_t gates_sb, gates_st;
  uint16_t* cells;
  int64_t cells_sb, cells_st;
  int64_t panel_threads = 1;  // as PanelForward's
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTMSC_NO_PANELS)
#define FASTMSC_PANELS 1

// The threads that share one row task's steps (lstm_cpu_panels.h, run_steps_on_threads) meet here after every step.
// They spin: a step lasts a microsecond or two, and a sleeping thread takes longer than that to wake. A thread that
// keeps waiting (its partner descheduled) yields the core.
class StepBarrier {
 public:
  // For `parties` threads, before any of them waits.
  void start(int64_t parties) {
    parties_ = parties;
    arrived_.store(0, std::memory_order_relaxed);
  }
  // Returns once every party has called wait `round` times (rounds count from 1).
  void wait(int64_t round) {
    arrived_.fetch_add(1, std::memory_order_acq_rel);
    for (int64_t spins = 0; arrived_.load(std::memory_order_acquire) < round * parties_; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  alignas(64) std::atomic<int64_t> arrived_{0};
  int64_t parties_ = 1;
};

// fn(part, parts, barrier) for part = 0 .. parts - 1, each on a thread of its own, parts = min(wanted, the threads
// torch's OpenMP team has) (barrier: parts > 1 only, else null). No num_threads clause (at::parallel_for avoids it
// too, for GOMP's thread pool); counting the team's threads instead means that every part has a thread and the barrier
// never waits for a part no thread runs. With wanted <= 1, inside another parallel region or without OpenMP, one part
// runs them all: fn(0, 1, null).
// fn must not throw (nothing may leave an OpenMP region): the panel kernels it runs allocate nothing.
template <typename F>
void run_parts(int64_t wanted, const F& fn) {
#ifdef _OPENMP
  if (wanted > 1 && !at::in_parallel_region()) {
    StepBarrier barrier;
    int64_t parts = 1;
#pragma omp parallel
    {
#pragma omp single
      {
        parts = std::min<int64_t>(omp_get_num_threads(), wanted);
        barrier.start(parts);
      }  // (the end of a single waits for the team)
      const int64_t part = omp_get_thread_num();
      if (part < parts) {
        c10::ParallelGuard guard(true);  // as at::parallel_for: a nested parallel_for runs inline
        fn(part, parts, parts > 1 ? &barrier : nullptr);
      }
    }
    return;
  }
#endif
  fn(0, 1, nullptr);
}

// Asks for every cache line of [p, p + bytes) to be loaded, the line holding the end included where p is not at a
// line's start; nothing for bytes <= 0.
inline void prefetch_lines(const void* p, int64_t bytes) {
  if (bytes <= 0) return;
  const auto first = reinterpret_cast<uintptr_t>(p), last = first + static_cast<uintptr_t>(bytes) - 1;
  for (uintptr_t line = first & ~uintptr_t{63}; line <= last; line += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(line), 0, 3);
  }
}

namespace avx512 {
#define FASTMSC_PANEL_TARGET "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"
#define FASTMSC_PANEL_WIDTH 16
#include "lstm_cpu_panels.h"
#undef FASTMSC_PANEL_TARGET
#undef FASTMSC_PANEL_WIDTH
}  // namespace avx512
namespace avx512bf16 {
#define FASTMSC_PANEL_TARGET "avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx2,fma"
#define FASTMSC_PANEL_WIDTH 16
#define FASTMSC_PANEL_BF16 1
#include "lstm_cpu_panels.h"
#undef FASTMSC_PANEL_TARGET
#undef FASTMSC_PANEL_WIDTH
#undef FASTMSC_PANEL_BF16
}  // namespace avx512bf16
namespace avx2 {
#define FASTMSC_PANEL_TARGET "avx2,fma"
#define FASTMSC_PANEL_WIDTH 8
#include "lstm_cpu_panels.h"
#undef FASTMSC_PANEL_TARGET
#undef FASTMSC_PANEL_WIDTH
}  // namespace avx2
#else
#define FASTMSC_PANELS 0
#endif

// Which code runs the float32 recurrence: the vectorised panels at the widest width the CPU supports, else the
// BLAS path below (other architectures, float64, the projection). FASTMSC_LSTM_CPU_KERNEL=avx512|avx2|blas asks for
// one (tests run each); a request the CPU cannot run falls back to the best it can.
enum class CpuKernel { kBlas, kAvx2, kAvx512 };

inline CpuKernel cpu_kernel() {
#if FASTMSC_PANELS
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  const CpuKernel best = has_avx512 ? CpuKernel::kAvx512 : has_avx2 ? CpuKernel::kAvx2 : CpuKernel::kBlas;
  const char* want = std::getenv("FASTMSC_LSTM_CPU_KERNEL");
  if (want == nullptr) return best;
  if (std::strcmp(want, "blas") == 0) return CpuKernel::kBlas;
  if (std::strcmp(want, "avx2") == 0 && has_avx2) return CpuKernel::kAvx2;
  return best;
#else
  return CpuKernel::kBlas;
#endif
}

// Whether bfloat16 layers run the AVX512_BF16 forward (lstm_fwd_bf16): on CPUs with it, unless the float32 kernel
// asked for is narrower than AVX-512 or FASTMSC_LSTM_CPU_BF16=0 (then bf16 widens to float32, as elsewhere).
inline bool cpu_bf16_kernel() {
#if FASTMSC_PANELS
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  const char* off = std::getenv("FASTMSC_LSTM_CPU_BF16");
  return has_bf16 && cpu_kernel() == CpuKernel::kAvx512 && (off == nullptr || std::strcmp(off, "0") != 0);
#else
  return false;
#endif
}

inline const char* cpu_kernel_name(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::kAvx512: return "avx512";
    case CpuKernel::kAvx2: return "avx2";
    default: return "blas";
  }
}

inline int64_t panel_width(CpuKernel kernel) { return kernel == CpuKernel::kAvx512 ? 16 : 8; }

// Memory for the op's large CPU tensors (outputs, saved activations, gradients: tens of MB in training), 2 MB-aligned
// and marked for transparent huge pages. With 4 KB pages every call faulted in, and the kernel zeroed, each page of its
// fresh buffers, and streamed them through the TLB a page at a time: at B = 128, T = 200, H = 128 on one thread that
// was 40% of a training step (188 ms against 130 ms with huge pages). torch's own allocator does this only under
// THP_MEM_ALLOC_ENABLE=1. The tensors are ordinary (resizable) CPU tensors; free() releases them.
#if defined(__linux__) && defined(MADV_HUGEPAGE)
// Freed blocks are kept for the next call that asks for their size (or up to half less), at most kMaxBlocks of them
// and FASTMSC_LSTM_CPU_CACHE_MB in all (2048 by default, 0: none; the oldest go first): a training loop allocates
// the same sizes every step, and fresh memory is faulted in and zeroed by the kernel every time, 2 MB pages assembled
// by compaction once other allocations have fragmented memory (B=128 T=1000 H=256 bi bf16: a 2.3 s step alone took
// 3.7 s next to nn.LSTM's steps). torch.ops.fastmsc.lstm_cpu_empty_cache() releases them.
class BlockCache {
 public:
  static constexpr size_t kMaxBlocks = 16;

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks may be freed during interpreter exit
    return *cache;
  }

  // A kept block of at least `size` bytes and at most twice that (the smallest), or null.
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = kept_.end();
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->size >= size && it->size <= 2 * size && (best == kept_.end() || it->size < best->size)) best = it;
    }
    if (best == kept_.end()) return nullptr;
    void* data = best->data;
    held_ -= best->size;
    kept_.erase(best);
    return data;
  }

  // A block of `size` bytes just allocated, to be given back through give().
  void track(void* data, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[data] = size;
  }

  void give(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = sizes_.find(data);
    if (found == sizes_.end()) {  // not one of ours (cannot happen): the system's
      std::free(data);
      return;
    }
    const size_t size = found->second;
    if (size > limit_) {
      release(found);
      return;
    }
    kept_.push_back({data, size});
    held_ += size;
    while (held_ > limit_ || kept_.size() > kMaxBlocks) {
      held_ -= kept_.front().size;
      release(sizes_.find(kept_.front().data));
      kept_.pop_front();
    }
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Block& block : kept_) release(sizes_.find(block.data));
    kept_.clear();
    held_ = 0;
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  BlockCache() {
    const char* mb = std::getenv("FASTMSC_LSTM_CPU_CACHE_MB");
    limit_ = (mb != nullptr ? static_cast<size_t>(std::max(0LL, std::atoll(mb))) : size_t{2048}) << 20;
  }
  void release(std::unordered_map<void*, size_t>::iterator block) {
    std::free(block->first);
    sizes_.erase(block);
  }

  std::mutex mutex_;
  std::deque<Block> kept_;
  std::unordered_map<void*, size_t> sizes_;  // every block allocated and not released, kept or in use
  size_t held_ = 0, limit_ = 0;
};

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;

  c10::DataPtr allocate(size_t bytes) override {
    const size_t size = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
    void* data = BlockCache::instance().take(size);
    if (data == nullptr) {
      TORCH_CHECK(posix_memalign(&data, kHugePage, size) == 0, "fastmsc::lstm: not enough memory: tried to allocate ",
                  bytes, " bytes");
      static const bool advise = [] {
        const char* off = std::getenv("FASTMSC_LSTM_HUGE_PAGES");
        return off == nullptr || std::strcmp(off, "0") != 0;
      }();
      if (advise) madvise(data, size, MADV_HUGEPAGE);  // advice only: without huge pages the memory is still good
      BlockCache::instance().track(data, size);
    }
    return {data, data, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  static void give_back(void* data) { BlockCache::instance().give(data); }
};

inline at::Tensor cpu_empty_unpoisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static HugePageAllocator allocator;
  int64_t bytes = static_cast<int64_t>(options.dtype().itemsize());
  for (int64_t size : sizes) bytes *= size;
  if (bytes < static_cast<int64_t>(HugePageAllocator::kHugePage)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::nullopt);
}
#else
inline at::Tensor cpu_empty_unpoisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
#endif

inline void empty_block_cache() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  BlockCache::instance().clear();
#endif
}

inline int64_t block_cache_bytes() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return static_cast<int64_t>(BlockCache::instance().held());
#else
  return 0;
#endif
}

// Under FASTMSC_POISON=1 (the test suite's setting) new buffers start as NaN, so that an element the loops should
// have written but did not fails the comparison with the reference instead of passing on leftover memory.
inline bool poisoning() {
  const char* poison = std::getenv("FASTMSC_POISON");
  return poison != nullptr && std::strcmp(poison, "1") == 0;
}

inline at::Tensor cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = cpu_empty_unpoisoned(sizes, options);
  if (poisoning() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// A contiguous copy of t (a CPU tensor) in cpu_empty's memory: at 2 MB and above the blocks BlockCache keeps, where
// torch's allocator would take glibc's heap, which returns freed memory of that size to the system and faults it in
// again on the next call (the weight gradients at H = 256, float32: 2 MB each).
inline at::Tensor cpu_contiguous_copy(const at::Tensor& t) {
  at::Tensor copy = cpu_empty_unpoisoned(t.sizes(), t.options());
  copy.copy_(t);
  return copy;
}

// torch.stack(parts) in cpu_empty's memory (see cpu_contiguous_copy): the layer's per-direction weights, stacked by
// its Python side on every call where they reach 2 MB (float32 at H = 256, bidirectional). With glibc's memory
// each call faulted 4 MB in again: 2.2-2.4 ms a call at B = 1, T = 1 instead of 0.3 ms. The dispatcher sends only CPU
// tensors here (a list with another device's tensor goes to that device's kernel, which there is none of).
at::Tensor lstm_cpu_stack(at::TensorList parts) {
  // The dispatcher refuses an empty list before this; a direct call should too.
  TORCH_CHECK(!parts.empty(), "fastmsc::lstm_cpu_stack: expected at least one tensor, got none");
  for (const at::Tensor& part : parts) {
    TORCH_CHECK(part.scalar_type() == parts[0].scalar_type() && part.sizes() == parts[0].sizes(),
                "fastmsc::lstm_cpu_stack: expected tensors of one dtype and shape, got ", part.scalar_type(), " ",
                part.sizes(), " next to ", parts[0].scalar_type(), " ", parts[0].sizes());
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the copies below are not the op's autograd
  std::vector<int64_t> sizes{static_cast<int64_t>(parts.size())};
  sizes.insert(sizes.end(), parts[0].sizes().begin(), parts[0].sizes().end());
  at::Tensor out = cpu_empty_unpoisoned(sizes, parts[0].options());
  for (size_t i = 0; i < parts.size(); ++i) out.select(0, static_cast<int64_t>(i)).copy_(parts[i]);
  return out;
}

// Scratch memory kept by the calling thread between calls, one buffer per use. The packed weights and the per-task
// buffers are rewritten on every call; fresh memory for them on every call costs page faults and zeroing by the kernel
// that, at small batches, took longer than the recurrence itself (2 MB of packed weights per direction at H = 256),
// and at B=32 T=150 H=128 (bidirectional, 20 MB of gate gradients) added 45% to the backward. Requests above
// kScratchKeepFloats get memory of their own, freed with the holder, so a thread keeps at most that much per use.
enum ScratchSlot : int {
  kSlotWih, kSlotWhh, kSlotBias, kSlotTasks, kSlotGateGrads, kSlotGradPairs, kSlotCount
};
constexpr int64_t kScratchKeepFloats = int64_t{8} << 20;  // 32 MB per slot

inline float* scratch_floats(ScratchSlot slot, int64_t floats, at::Tensor& holder) {
  thread_local at::Tensor kept[kSlotCount];
  const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
  if (floats > kScratchKeepFloats) {
    holder = cpu_empty({floats}, options);
    return holder.data_ptr<float>();
  }
  at::Tensor& buffer = kept[slot];
  if (!buffer.defined() || buffer.numel() < floats) buffer = cpu_empty({std::max<int64_t>(floats, 1)}, options);
  if (poisoning()) buffer.fill_(std::numeric_limits<float>::quiet_NaN());  // no leftovers of the last call either
  return buffer.data_ptr<float>();
}

inline int64_t gate_panels_floats(int64_t D, int64_t H, int64_t K, int64_t width) {
  return D * ((H + width - 1) / width) * K * 4 * width;
}

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols. A function of its own, with restrict pointers
// and locals only: inlined into the parallel lambda, the loop kept its indices in memory (captured by reference).
FASTMSC_VECTORIZABLE void transpose_block(const float* __restrict src, int64_t src_ld, int64_t rows, int64_t cols,
                                          float* __restrict dst, int64_t dst_ld) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * dst_ld + r] = src[r * src_ld + c];
  }
}

// transpose_block of a panel's width rows: whole width x width tiles through the vector registers of the kernel that
// packs (width 16 is packed only for the AVX-512 kernel, 8 for the AVX2 one), the rest one float at a time.
inline void transpose_panel_rows(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst,
                                 int64_t dst_ld, int64_t width) {
  int64_t c0 = 0;
#if FASTMSC_PANELS
  if (rows == width && (width == 16 || width == 8)) {
    for (; c0 + width <= cols; c0 += width) {
      if (width == 16) {
        avx512::transpose_tile(src + c0, src_ld, dst + c0 * dst_ld, dst_ld);
      } else {
        avx2::transpose_tile(src + c0, src_ld, dst + c0 * dst_ld, dst_ld);
      }
    }
  }
#endif
  if (c0 < cols) transpose_block(src + c0, src_ld, rows, cols - c0, dst + c0 * dst_ld, dst_ld);
}

// w (D * 4H rows, K columns, row-major) into (D, ceil(H / width), K, 4 * width): panel p, row k holds
// w[s * H + p * width + u, k] at lane s * width + u (gate s, hidden unit p * width + u), zero past H.
// A transpose, done in blocks of kPackDepth k so that the source rows being read (width rows of kPackDepth floats) and
// the panel rows being written stay in L1.
inline void pack_gate_panels(const float* w, int64_t D, int64_t H, int64_t K, int64_t width, float* dst) {
  constexpr int64_t kPackDepth = 64;
  const int64_t P = (H + width - 1) / width, lanes = 4 * width;
  at::parallel_for(0, D * P, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * lanes)), [&](int64_t begin, int64_t end) {
    for (int64_t dp = begin; dp < end; ++dp) {
      const int64_t d = dp / P, j0 = (dp % P) * width, units = std::min(width, H - j0);
      float* panel = dst + dp * K * lanes;
      for (int64_t k0 = 0; k0 < K; k0 += kPackDepth) {
        const int64_t depth = std::min(kPackDepth, K - k0);
        for (int64_t s = 0; s < 4; ++s) {
          transpose_panel_rows(w + (d * 4 * H + s * H + j0) * K + k0, K, units, depth, panel + k0 * lanes + s * width,
                               lanes, width);
          if (units < width) {  // padded hidden units
            for (int64_t k = k0; k < k0 + depth; ++k) {
              std::fill(panel + k * lanes + s * width + units, panel + k * lanes + (s + 1) * width, 0.0f);
            }
          }
        }
      }
    }
  });
}

// The bias (D * 4H) in the column order of pack_gate_panels: (D, ceil(H / width) * 4 * width).
inline void pack_gate_bias(const float* bias, int64_t D, int64_t H, int64_t width, float* dst) {
  const int64_t P = (H + width - 1) / width, lanes = 4 * width;
  std::fill(dst, dst + D * P * lanes, 0.0f);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t s = 0; s < 4; ++s) {
      for (int64_t j = 0; j < H; ++j) dst[d * P * lanes + (j / width) * lanes + s * width + j % width] = bias[d * 4 * H + s * H + j];
    }
  }
}

inline int64_t column_panels_floats(int64_t D, int64_t K, int64_t N, int64_t width) {
  return D * ((N + 4 * width - 1) / (4 * width)) * K * 4 * width;
}

// D matrices (K x N, row stride ld, the d-th at w + d * K * ld) into (D, ceil(N / (4 * width)), K, 4 * width): panel p
// holds columns [p * 4 * width, + 4 * width), zero past N.
inline void pack_column_panels(const float* w, int64_t D, int64_t K, int64_t N, int64_t width, int64_t ld,
                               float* dst) {
  const int64_t lanes = 4 * width, P = (N + lanes - 1) / lanes;
  at::parallel_for(0, D * K, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t dk = begin; dk < end; ++dk) {
      const int64_t d = dk / K, k = dk % K;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t n0 = p * lanes, n = std::min(lanes, N - n0);
        float* row = dst + ((d * P + p) * K + k) * lanes;
        std::copy_n(w + (d * K + k) * ld + n0, n, row);
        std::fill(row + n, row + lanes, 0.0f);
      }
    }
  });
}

// h_prev's rows for the weight gradients (pack_xh_panels, pair_weight_gradients), read straight from the layer's output
// without an h_prev copy: memory row `row` of (B, T, ·) in out's order (time-major where out is not contiguous; out
// (B, T, D*H) dense in either order) -> the H elements of direction d's state that step's recurrent product used (a
// row of out or of h0 (D, B, H)), or null for zeros (a sequence's first step without h0, padded steps). E: float, or
// the bits of bf16.
template <typename E>
struct HPrevRows {
  const LstmSizes& s;
  const int64_t* lens;
  const E* out;
  int64_t out_sb, out_st;
  bool time_major;
  const E* h0;  // (D, B, H) or null
  int64_t d;

  HPrevRows(const LstmSizes& sizes, const int64_t* lengths, const at::Tensor& out_t, const E* h0_data, int64_t dir)
      : s(sizes), lens(lengths), out(reinterpret_cast<const E*>(out_t.data_ptr())), out_sb(out_t.stride(0)),
        out_st(out_t.stride(1)), time_major(!out_t.is_contiguous()), h0(h0_data), d(dir) {}

  const E* operator()(int64_t row) const {
    const int64_t B = s.batch, T_ = s.steps;
    const int64_t b = time_major ? row % B : row / T_, t = time_major ? row / B : row % T_;
    const int64_t len = lens != nullptr ? lens[b] : T_;
    const bool first = d == 0 ? t == 0 : t == len - 1;
    return t >= len ? nullptr
           : first  ? (h0 != nullptr ? h0 + (d * B + b) * s.hidden : nullptr)
                    : out + b * out_sb + (d == 0 ? t - 1 : t + 1) * out_st + d * s.hidden;
  }
};

// Rows [r0, r0 + rows) of [x | h_prev] (memory rows of x, dense (B*T, I) in out's order, each followed by its h_prev
// row of direction d, zeros for null), packed as pack_column_panels packs a (rows, I + H) matrix: the right factor of
// both weight gradients of direction d.
inline void pack_xh_panels(const float* x, int64_t I, const HPrevRows<float>& h_prev, int64_t r0, int64_t rows,
                           int64_t width, float* dst) {
  const int64_t H = h_prev.s.hidden, N = I + H, lanes = 4 * width, P = (N + lanes - 1) / lanes;
  constexpr int64_t kAhead = 8;  // rows: as in pair_weight_gradients' packing
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t row = r0 + k;
      if (k + kAhead < end) {
        prefetch_lines(x + (row + kAhead) * I, I * sizeof(float));
        if (const float* h = h_prev(row + kAhead)) prefetch_lines(h, H * sizeof(float));
      }
      const float* h = h_prev(row);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t n0 = p * lanes, n_end = std::min(N, n0 + lanes);
        float* dst_row = dst + (p * rows + k) * lanes;
        for (int64_t n = n0; n < n_end;) {  // the part of x, then of h, in this panel
          const bool in_x = n < I;
          const int64_t part_end = in_x ? std::min(n_end, I) : n_end;
          float* out = dst_row + (n - n0);
          if (in_x) {
            std::copy(x + row * I + n, x + row * I + part_end, out);
          } else if (h != nullptr) {
            std::copy(h + (n - I), h + (part_end - I), out);
          } else {
            std::fill(out, out + (part_end - n), 0.0f);
          }
          n = part_end;
        }
        std::fill(dst_row + (n_end - n0), dst_row + lanes, 0.0f);
      }
    }
  });
}

// The panels of pack_column_panels in scratch memory (or, large, in holder).
inline const float* packed_columns(ScratchSlot slot, const float* w, int64_t D, int64_t K, int64_t N, int64_t width,
                                   int64_t ld, at::Tensor& holder) {
  float* dst = scratch_floats(slot, column_panels_floats(D, K, N, width), holder);
  pack_column_panels(w, D, K, N, width, ld, dst);
  return dst;
}

// The split of a call's rows into tasks: every direction, and batch groups of at least min_rows rows, up to one task per
// thread. Rows never interact, so each task runs the whole sequence on its own, without a barrier between steps (a
// single task's hidden units may be shared by threads that meet once a step instead: panel_threads_for).
struct RowTasks {
  int64_t directions, batch, groups;
  RowTasks(int64_t D, int64_t B, int64_t min_rows) : directions(D), batch(B) {
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    groups = std::clamp<int64_t>((threads + D - 1) / D, 1, std::max<int64_t>(1, B / min_rows));
  }
  int64_t count() const { return directions * groups; }
  int64_t most_rows() const { return (batch + groups - 1) / groups; }
  // fn(task, d, b_begin, b_end) for every task, on the threads.
  template <typename F>
  void run(const F& fn) const {
    auto one = [&](int64_t task) {
      const int64_t d = task / groups, g = task % groups;
      fn(task, d, batch * g / groups, batch * (g + 1) / groups);
    };
    if (count() == 1 || at::in_parallel_region() || at::get_num_threads() == 1) {
      for (int64_t task = 0; task < count(); ++task) one(task);
    } else {
      at::parallel_for(0, count(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) one(task);
      });
    }
  }
};

// ---------------------------------------------------------------------------------------------------

// Steps whose input projections are computed by one GEMM: about 256 rows (steps x batch) keep that GEMM
// efficient while the chunk's gates (rows x 4H) stay in cache for the recurrence that consumes them.
inline int64_t projection_chunk_steps(int64_t batch, int64_t steps) {
  return std::clamp<int64_t>((256 + batch - 1) / batch, 1, steps);
}

// x (B, T, I) and w_ih (D*4H, I) contiguous; bias (D*4H) or null. The steps are processed in chunks: each
// direction copies its chunk's inputs step-major, projects them with one GEMM into a small buffer (instead of
// one (B, T, D*4H) GEMM for everything up front, which is written and read back through memory), then adds the
// recurrent product step by step and applies the gates. Training (gates non-null): the activated gates
// (B, T, D*4H) and cell states (B, T, D*H) are stored for the backward. w_hr (D, P, H) or null: the projection.
template <typename T>
void forward_impl(const LstmSizes& s, const T* x, const T* w_ih, const T* bias, const T* w_hh, const T* w_hr,
                  const int64_t* lens, bool has_h0, T* out, T* h_state, T* c_state, T* gates, T* cells) {
  const int64_t B = s.batch, T_ = s.steps, I = s.input, H = s.hidden, D = s.directions, G = 4 * H, R = s.proj;
  const int64_t ld_out = T_ * D * R, ld_cells = T_ * D * H, ld_gates = T_ * D * G;
  const bool training = gates != nullptr, projected = w_hr != nullptr;
  const auto row = training ? (projected ? Rows<T>::fwd_train_proj : Rows<T>::fwd_train)
                            : (projected ? Rows<T>::fwd_infer_proj : Rows<T>::fwd_infer);
  const std::vector<T> zero_bias(bias == nullptr ? G : 0, T(0));
  const int64_t chunk = projection_chunk_steps(B, T_);
  // With more threads than directions the projections run between the chunks' recurrences, each GEMM on all
  // threads; otherwise inside each direction's thread, next to its recurrence.
  const bool project_in_direction = at::get_num_threads() <= D || at::in_parallel_region();
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor x_chunks = at::empty({D, chunk * B, I}, options);
  const at::Tensor z_chunks = at::empty({D, chunk * B, G}, options);
  std::vector<PackedWeightGemm<T>> projections, recurrents, hidden_projections;
  projections.reserve(D);
  recurrents.reserve(D);
  for (int64_t d = 0; d < D; ++d) {
    projections.emplace_back(chunk * B, G, I, w_ih + d * G * I, I, /*w_transposed=*/true, G);
    recurrents.emplace_back(B, G, R, w_hh + d * G * R, R, /*w_transposed=*/true, G);
  }
  // With the projection: o * tanh(c) of the step (D, B, H) and its projection (D, B, R), copied to the state and
  // the output of the rows still running. Zeroed so that finished rows, which the pass skips, hold finite values.
  at::Tensor unprojected, projected_h;
  if (projected) {
    unprojected = at::zeros({D, B, H}, options);
    projected_h = at::empty({D, B, R}, options);
    hidden_projections.reserve(D);
    for (int64_t d = 0; d < D; ++d) {
      hidden_projections.emplace_back(B, R, H, w_hr + d * R * H, H, /*w_transposed=*/true, R);
    }
  }

  auto time_of = [&](int64_t d, int64_t step) { return d == 0 ? step : T_ - 1 - step; };
  // Pre-activations without the bias of steps [first, first + n) of direction d: z_chunks[d] (n*B, 4H).
  auto project = [&](int64_t d, int64_t first, int64_t n) {
    T* x_chunk = x_chunks.data_ptr<T>() + d * chunk * B * I;
    T* z_chunk = z_chunks.data_ptr<T>() + d * chunk * B * G;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t t = time_of(d, first + k);
      for (int64_t b = 0; b < B; ++b) std::memcpy(x_chunk + (k * B + b) * I, x + (b * T_ + t) * I, I * sizeof(T));
    }
    if (n == chunk) {
      projections[d].run(x_chunk, I, T(0), z_chunk, G);
    } else {
      gemm_rowmajor<T>(n * B, G, I, x_chunk, I, w_ih + d * G * I, I, /*b_transposed=*/true, T(0), z_chunk, G);
    }
  };
  auto recur = [&](int64_t d, int64_t first, int64_t n) {
    T* hs = h_state + d * B * R;
    T* cs = c_state + d * B * H;
    T* unprojected_d = projected ? unprojected.data_ptr<T>() + d * B * H : nullptr;
    const T* bias_d = bias != nullptr ? bias + d * G : zero_bias.data();
    for (int64_t k = 0; k < n; ++k) {
      const int64_t step = first + k, t = time_of(d, step);
      T* z = z_chunks.data_ptr<T>() + (d * chunk + k) * B * G;  // (B, 4H) pre-activations of this step
      // Without h0 the first recurrent product is zero.
      if (step > 0 || has_h0) recurrents[d].run(hs, R, T(1), z, G);
      at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t out_at = b * ld_out + t * D * R + d * R;
          T* act = training ? gates + b * ld_gates + t * D * G + d * G : nullptr;
          T* c_out = training ? cells + b * ld_cells + t * D * H + d * H : nullptr;
          if (lens != nullptr && t >= lens[b]) {
            // Past this sequence's end: output zero, state carried unchanged (as packing gives). The saved
            // gates and cells there are never read; zeros keep the returned tensors free of stale memory.
            std::fill(out + out_at, out + out_at + R, T(0));
            if (training) {
              std::fill(act, act + G, T(0));
              std::fill(c_out, c_out + H, T(0));
            }
            continue;
          }
          if (projected) {
            row(z + b * G, bias_d, cs + b * H, unprojected_d + b * H, nullptr, c_out, act, H);
          } else {
            row(z + b * G, bias_d, cs + b * H, hs + b * H, out + out_at, c_out, act, H);
          }
        }
      });
      if (projected) {
        T* h_new = projected_h.data_ptr<T>() + d * B * R;
        hidden_projections[d].run(unprojected_d, H, T(0), h_new, R);
        at::parallel_for(0, B, row_grain(R), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            if (lens != nullptr && t >= lens[b]) continue;
            std::copy(h_new + b * R, h_new + (b + 1) * R, hs + b * R);
            std::copy(h_new + b * R, h_new + (b + 1) * R, out + b * ld_out + t * D * R + d * R);
          }
        });
      }
    }
  };

  for (int64_t first = 0; first < T_; first += chunk) {
    const int64_t n = std::min(chunk, T_ - first);
    if (!project_in_direction) {
      for (int64_t d = 0; d < D; ++d) project(d, first, n);
    }
    for_each_direction(D, [&](int64_t d) {
      if (project_in_direction) project(d, first, n);
      recur(d, first, n);
    });
  }
}

#if FASTMSC_PANELS
// Fewest batch rows a task gets when the batch is split across threads: below that the microkernel's rows are mostly
// empty and the weights are streamed once per task anyway.
constexpr int64_t kMinTaskRows = 4;

// Threads that share the panels of a call's one row task: the forward's and the BPTT loop's hidden units
// (run_steps_on_threads and backward_rows, lstm_cpu_panels.h). A single direction of fewer than 2 * kMinTaskRows rows
// is one task, which would leave torch's other threads idle: two threads then split its hidden units where a step's
// recurrent product has at least kMinSharedWork rows x H x H (twice that for bf16, whose products run at twice the
// rate). Measured on two cores (AMD EPYC), float32 B = 1, T = 500 inference: 0.33 -> 0.24 ms at H = 64, 0.79 -> 0.55
// ms at H = 100, and at H = 256 (T = 512) 6.2 -> 2.1 ms, each core's L2 holding its half of w_hh; at H = 32 the
// barrier and the exchange of h made it slower. More than two threads were not measured, so no more share a task.
constexpr int64_t kMinSharedWork = 4096;

inline int64_t panel_threads_for(int64_t D, int64_t B, int64_t H, bool bf16) {
#ifdef _OPENMP
  if (RowTasks(D, B, kMinTaskRows).count() != 1 || at::in_parallel_region() || at::get_num_threads() < 2) return 1;
  return B * H * H >= kMinSharedWork * (bf16 ? 2 : 1) ? 2 : 1;
#else
  (void)D, (void)B, (void)H, (void)bf16;
  return 1;  // run_parts runs one part
#endif
}

// rows(a, d, b_begin, b_end, scratch) over the call's row tasks (RowTasks), each with its own
// scratch_floats_for(a, rows) floats of the thread's scratch memory.
template <typename Args>
void run_row_tasks(const Args& a, int64_t D, void (*rows)(const Args&, int64_t, int64_t, int64_t, float*),
                   int64_t (*scratch_floats_for)(const Args&, int64_t)) {
  const RowTasks tasks(D, a.batch, kMinTaskRows);
  const int64_t per_task = scratch_floats_for(a, tasks.most_rows());
  at::Tensor holder;
  float* scratch = scratch_floats(kSlotTasks, tasks.count() * per_task, holder);
  tasks.run([&](int64_t task, int64_t d, int64_t b0, int64_t b1) { rows(a, d, b0, b1, scratch + task * per_task); });
}

void panel_forward(CpuKernel kernel, const LstmSizes& s, const LstmForward& f, const at::Tensor& w_ih,
                   const at::Tensor& bias, bool has_h0, const at::Tensor& gates, bool training) {
  const int64_t B = s.batch, T_ = s.steps, I = s.input, H = s.hidden, D = s.directions, width = panel_width(kernel);
  at::Tensor holders[3];
  float* w_ih_p = scratch_floats(kSlotWih, gate_panels_floats(D, H, I, width), holders[0]);
  float* w_hh_p = scratch_floats(kSlotWhh, gate_panels_floats(D, H, H, width), holders[1]);
  pack_gate_panels(w_ih.data_ptr<float>(), D, H, I, width, w_ih_p);
  pack_gate_panels(f.w_hh.data_ptr<float>(), D, H, H, width, w_hh_p);
  float* bias_p = nullptr;
  if (bias.defined()) {
    bias_p = scratch_floats(kSlotBias, gate_panels_floats(D, H, 1, width), holders[2]);
    pack_gate_bias(bias.data_ptr<float>(), D, H, width, bias_p);
  }
  // h_n starts as a copy of h0 (prepare_forward); each task reads its rows of it before writing them back.
  // Rows (b, t) by their strides: batch-first or time-major alike.
  PanelForward a{B, T_, I, H, (H + width - 1) / width, f.x.data_ptr<float>(), f.x.stride(0), f.x.stride(1),
                 w_ih_p, w_hh_p, bias_p, ptr_or_null<int64_t>(f.lens),
                 has_h0 ? f.h_n.data_ptr<float>() : nullptr, f.out.data_ptr<float>(), f.out.stride(0),
                 f.out.stride(1), f.h_n.data_ptr<float>(), f.c_n.data_ptr<float>(),
                 training ? gates.data_ptr<float>() : nullptr, gates.stride(0), training ? gates.stride(1) : 0,
                 training ? f.cells.data_ptr<float>() : nullptr, f.cells.stride(0),
                 training ? f.cells.stride(1) : 0};
  a.panel_threads = panel_threads_for(D, B, H, /*bf16=*/false);
  if (kernel == CpuKernel::kAvx512) {
    run_row_tasks(a, D, avx512::forward_rows, avx512::forward_scratch_floats);
  } else {
    run_row_tasks(a, D, avx2::forward_rows, avx2::forward_scratch_floats);
  }
}

// The GEMM g (PanelGemm or PairGemm) on all threads, split over rows of C: rows(begin, end) computes those rows.
// At least about a million products per task (k_products: products per unit of g.k, 2 for pairs): below that a
// thread fork costs more than it saves. An empty depth gives C = 0 (left as it is when accumulating).
template <typename Gemm, typename Rows>
void gemm_on_threads(const Gemm& g, int64_t k_products, const Rows& rows) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    if (!g.accumulate) {
      for (int64_t r = 0; r < g.m; ++r) std::fill(g.c + r * g.ldc, g.c + r * g.ldc + g.n, 0.0f);
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / (g.n * g.k * k_products));
  at::parallel_for(0, g.m, grain, rows);
}

void panel_gemm(CpuKernel kernel, const PanelGemm& g) {
  gemm_on_threads(g, 1, [&](int64_t begin, int64_t end) {
    if (kernel == CpuKernel::kAvx512) {
      avx512::gemm_rows(g, begin, end);
    } else {
      avx2::gemm_rows(g, begin, end);
    }
  });
}

// Rows per chunk of the weight gradients' products: `fits` (what the kept scratch memory holds), or
// FASTMSC_LSTM_BWD_CHUNK_ROWS (the tests, to cross chunks at small sizes).
inline int64_t weight_gradient_chunk_rows(int64_t fits) {
  const char* rows = std::getenv("FASTMSC_LSTM_BWD_CHUNK_ROWS");
  return std::max<int64_t>(1, rows != nullptr ? std::atoll(rows) : fits);
}

// dx = dG · w_ih, dW_ih = dGᵀ · x and dW_hh = dGᵀ · h_prev (per direction) on the panel GEMM, into bw for
// finish_backward. dG, x and h_prev share their row order (b, t).
void panel_weight_gradients(CpuKernel kernel, LstmBackward& bw) {
  const LstmSizes& s = bw.s;
  const int64_t N = s.batch * s.steps, I = s.input, H = s.hidden, D = s.directions, G = 4 * H, width = panel_width(kernel);
  const float* dg = bw.dgates.data_ptr<float>();
  const at::TensorOptions options = bw.x.options();
  if (bw.need_dx) {
    const at::Tensor w_ih = bw.w_ih.contiguous();
    at::Tensor holder;
    const bool in_place = I % (4 * width) == 0;
    const float* w = in_place ? w_ih.data_ptr<float>()
                              : packed_columns(kSlotWih, w_ih.data_ptr<float>(), 1, D * G, I, width, I, holder);
    bw.dx = empty_in_order(&cpu_empty, s.batch, s.steps, I, options, bw.time_major);  // rows in dG's order
    panel_gemm(kernel, {N, I, D * G, dg, D * G, 1, w, in_place ? I : 0, bw.dx.data_ptr<float>(), I, false});
  }
  if (bw.need_dweights) {
    // Per direction one product dG_dᵀ · [x | h_prev_d] (4H x (I + H)) gives dW_ih_d and dW_hh_d: at I = H = 32 the two
    // products apart filled half of each 64-column panel (AVX-512) and read the gate gradients twice. The price: x is
    // packed once per direction, where a whole number of panels used to be read in place. The rows go in chunks
    // whose packed factor fits the kept scratch memory; the chunks accumulate.
    const int64_t columns = I + H, panel_floats = (columns + 4 * width - 1) / (4 * width) * 4 * width;
    const int64_t chunk = weight_gradient_chunk_rows(kScratchKeepFloats / panel_floats);
    const float* x = bw.x.data_ptr<float>();  // dense in bw's order: memory rows pair with dG's
    at::Tensor dw = N == 0 ? at::zeros({D, G, columns}, options) : cpu_empty({D, G, columns}, options), holder;
    float* xh = scratch_floats(kSlotTasks, column_panels_floats(1, std::min(chunk, N), columns, width), holder);
    for (int64_t d = 0; d < D; ++d) {
      const HPrevRows<float> h_prev(s, ptr_or_null<int64_t>(bw.lens), bw.out, ptr_or_null<float>(bw.h0), d);
      for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        const int64_t rows = std::min(chunk, N - r0);
        pack_xh_panels(x, I, h_prev, r0, rows, width, xh);
        panel_gemm(kernel, {G, columns, rows, dg + r0 * D * G + d * G, 1, D * G, xh, 0,
                            dw.data_ptr<float>() + d * G * columns, columns, r0 > 0});
      }
    }
    bw.dw_ih = cpu_contiguous_copy(dw.narrow(2, 0, I)).view({D * G, I});
    bw.dw_hh = cpu_contiguous_copy(dw.narrow(2, I, H));
  }
}

// Pair panels (see PairGemm) of the K x n bf16 matrix whose row k is row(k) (n elements, or null for zeros; k < K):
// (ceil(n / 64), ceil(K / 2), 64) words.
template <typename RowFn>
void pack_pair_panels(int64_t K, int64_t n, uint32_t* dst, const RowFn& row) {
  const int64_t pairs = (K + 1) / 2;
  at::parallel_for(0, pairs, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t kp = begin; kp < end; ++kp) {
      avx512bf16::pack_pair_row(row(2 * kp), 2 * kp + 1 < K ? row(2 * kp + 1) : nullptr, n, nullptr, nullptr, 0,
                                dst + kp * 64, pairs * 64);
    }
  });
}

inline int64_t pair_panels_words(int64_t K, int64_t n) { return (n + 63) / 64 * ((K + 1) / 2) * 64; }

// A tensor's data as E, without a dtype check (E = uint16_t: a bf16 tensor's bits); null where undefined.
template <typename E>
E* elements_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<E*>(t.data_ptr()) : nullptr;
}

// The BPTT loop into bw.dgates, dh_state and dc_state, the saved state in E; dbias_rows (D, B, 4H) float32 zeros, or
// null: each row's gate gradients are summed into it (see PanelBackwardOf). float32: the products in float32 on w_hh's
// panels. The bits of bf16: bw.dgates is bf16, and the recurrent product multiplies the rounded dG_t by w_hh's bf16
// pairs.
template <typename E>
void panel_backward(CpuKernel kernel, LstmBackward& bw, float* dbias_rows = nullptr) {
  constexpr bool kRounded = std::is_same_v<E, uint16_t>;
  const LstmSizes& s = bw.s;
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, width = panel_width(kernel);
  const int64_t G = 4 * H, lanes = 4 * width, P = (H + lanes - 1) / lanes;
  bool in_place = H % lanes == 0;
  at::Tensor holder;
  const float* w_hh_p = nullptr;
  if constexpr (kRounded) {  // pair panels: (D, P, 2H pairs, 64) words
    const uint16_t* w = elements_or_null<const uint16_t>(bw.w_hh);
    auto* packed = reinterpret_cast<uint32_t*>(scratch_floats(kSlotWhh, D * pair_panels_words(G, H), holder));
    for (int64_t d = 0; d < D; ++d) {
      pack_pair_panels(G, H, packed + d * pair_panels_words(G, H), [&](int64_t k) { return w + (d * G + k) * H; });
    }
    w_hh_p = reinterpret_cast<const float*>(packed);  // words, read back as such
    in_place = false;
  } else {
    w_hh_p = in_place ? bw.w_hh.data_ptr<float>()
                      : packed_columns(kSlotWhh, bw.w_hh.data_ptr<float>(), D, G, H, width, H, holder);
  }
  const int64_t panel_stride = kRounded ? G / 2 * lanes : in_place ? lanes : G * lanes;
  const int64_t direction_stride = kRounded ? pair_panels_words(G, H) : in_place ? G * H : P * G * lanes;
  const PanelBackwardOf<E> a{B, T_, H, P, w_hh_p, in_place ? H : lanes, panel_stride, direction_stride,
                             ptr_or_null<int64_t>(bw.lens),
                             elements_or_null<const E>(bw.c0), elements_or_null<const E>(bw.dout),
                             bw.dout.defined() ? bw.dout.stride(0) : 0, bw.dout.defined() ? bw.dout.stride(1) : 0,
                             elements_or_null<const E>(bw.gates), bw.gates.stride(0), bw.gates.stride(1),
                             elements_or_null<const E>(bw.cells), bw.cells.stride(0), bw.cells.stride(1),
                             kRounded ? nullptr : bw.dgates.data_ptr<float>(), bw.dgates.stride(0),
                             bw.dgates.stride(1), bw.dh_state.data_ptr<float>(), bw.dc_state.data_ptr<float>(),
                             bw.need_dstate, kRounded ? elements_or_null<uint16_t>(bw.dgates) : nullptr, dbias_rows,
                             panel_threads_for(D, B, H, kRounded)};
  if constexpr (kRounded) {
    run_row_tasks(a, D, avx512bf16::backward_rows<E>, avx512bf16::backward_scratch_floats<E>);
  } else if (kernel == CpuKernel::kAvx512) {
    run_row_tasks(a, D, avx512::backward_rows<E>, avx512::backward_scratch_floats<E>);
  } else {
    run_row_tasks(a, D, avx2::backward_rows<E>, avx2::backward_scratch_floats<E>);
  }
}

// w (D * 4H rows, K columns, bf16) into (D, ceil(H / 16), ceil(K / 2), 64, 2): panel p, pair kp, lane s * 16 + u holds
// (w[s * H + p * 16 + u, 2kp], w[..., 2kp + 1]), zero past H and K.
FASTMSC_VECTORIZABLE void pack_pairs_block(const uint16_t* __restrict rows, int64_t K, int64_t units, int64_t k0,
                                           int64_t k1, uint16_t* __restrict panel) {
  constexpr int64_t kLanes = 64;
  for (int64_t u = 0; u < 16; ++u) {
    for (int64_t k = k0; k < k1; ++k) panel[((k / 2) * kLanes + u) * 2 + k % 2] = u < units ? rows[u * K + k] : 0;
  }
}

// With K even and w 4-byte aligned, a pair is one 32-bit word of its row: the packing is pack_gate_panels' transpose of
// 32-bit words (the bits moved, never converted), 16 x 16 tiles in registers. Otherwise two bf16 at a time.
inline void pack_gate_panels_bf16(const uint16_t* w, int64_t D, int64_t H, int64_t K, uint16_t* dst) {
  constexpr int64_t kPackDepth = 64;
  const int64_t P = (H + 15) / 16, pairs = (K + 1) / 2, panel_size = pairs * 64 * 2;
  const bool words = K % 2 == 0 && reinterpret_cast<uintptr_t>(w) % 4 == 0;
  at::parallel_for(0, D * P, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * 64)), [&](int64_t begin, int64_t end) {
    for (int64_t dp = begin; dp < end; ++dp) {
      const int64_t d = dp / P, j0 = (dp % P) * 16, units = std::min<int64_t>(16, H - j0);
      uint16_t* panel = dst + dp * panel_size;
      if (!words) {
        if (K % 2 == 1) std::fill(panel + (pairs - 1) * 128, panel + pairs * 128, uint16_t(0));  // the zero partner
        for (int64_t k0 = 0; k0 < K; k0 += 64) {
          for (int64_t s = 0; s < 4; ++s) {
            pack_pairs_block(w + (d * 4 * H + s * H + j0) * K, K, units, k0, std::min(K, k0 + 64), panel + s * 16 * 2);
          }
        }
        continue;
      }
      float* panel_words = reinterpret_cast<float*>(panel);
      for (int64_t p0 = 0; p0 < pairs; p0 += kPackDepth) {
        const int64_t depth = std::min(kPackDepth, pairs - p0);
        for (int64_t s = 0; s < 4; ++s) {
          const float* rows = reinterpret_cast<const float*>(w + (d * 4 * H + s * H + j0) * K) + p0;
          transpose_panel_rows(rows, K / 2, units, depth, panel_words + p0 * 64 + s * 16, 64, 16);
          if (units < 16) {  // padded hidden units
            for (int64_t p = p0; p < p0 + depth; ++p) {
              std::fill(panel_words + p * 64 + s * 16 + units, panel_words + p * 64 + (s + 1) * 16, 0.0f);
            }
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd_bf16_cpu(
    const at::Tensor& x_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& bias_in,
    const c10::optional<at::Tensor>& h0_in, const c10::optional<at::Tensor>& c0_in,
    const c10::optional<at::Tensor>& lengths, bool training) {
  TORCH_CHECK(cpu_bf16_kernel(), "fastmsc::lstm_fwd_bf16: needs a CPU with AVX512_BF16 (and the AVX-512 kernels "
              "selected); torch.ops.fastmsc.lstm_cpu_bf16() says whether it runs here");
  const LstmSizes s = check_lstm_args(x_in, w_ih_in, w_hh_in, bias_in, h0_in, c0_in, lengths, c10::nullopt, true);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = s.batch, T_ = s.steps, I = s.input, H = s.hidden, D = s.directions;
  const bool time_major = is_time_major(x_in);
  const at::Tensor x = in_order(x_in, time_major), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const at::Tensor h0 = present(h0_in) ? h0_in->contiguous() : at::Tensor();
  const at::Tensor c0 = present(c0_in) ? c0_in->contiguous() : at::Tensor();
  const at::Tensor bias = present(bias_in) ? bias_in->contiguous() : at::Tensor();
  const at::Tensor lens = present(lengths) ? lengths->contiguous() : at::Tensor();
  const at::TensorOptions options = x.options();
  at::Tensor out = empty_in_order(&cpu_empty, B, T_, D * H, options, time_major);
  at::Tensor h_n = at::empty({D, B, H}, options), c_n = at::empty({D, B, H}, options);
  at::Tensor gates = training ? empty_in_order(&cpu_empty, B, T_, D * 4 * H, options, time_major)
                              : at::empty({0}, options);
  at::Tensor cells = training ? empty_in_order(&cpu_empty, B, T_, D * H, options, time_major) : at::empty({0}, options);
  if (B == 0) return {out, h_n, c_n, gates, cells};
  const int64_t P = (H + 15) / 16;
  auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  at::Tensor holders[3];
  auto pairs_floats = [&](int64_t K) { return (D * P * ((K + 1) / 2) * 64 * 2 + 1) / 2; };
  uint16_t* w_ih_p = reinterpret_cast<uint16_t*>(scratch_floats(kSlotWih, pairs_floats(I), holders[0]));
  uint16_t* w_hh_p = reinterpret_cast<uint16_t*>(scratch_floats(kSlotWhh, pairs_floats(H), holders[1]));
  pack_gate_panels_bf16(bits(w_ih), D, H, I, w_ih_p);
  pack_gate_panels_bf16(bits(w_hh), D, H, H, w_hh_p);
  float* bias_p = nullptr;
  if (bias.defined()) {
    bias_p = scratch_floats(kSlotBias, gate_panels_floats(D, H, 1, 16), holders[2]);
    pack_gate_bias(bias.data_ptr<float>(), D, H, 16, bias_p);
  }
  PanelForwardBf16 a{B, T_, I, H, P, bits(x), x.stride(0), x.stride(1), w_ih_p, w_hh_p, bias_p,
                     ptr_or_null<int64_t>(lens), h0.defined() ? bits(h0) : nullptr,
                     c0.defined() ? bits(c0) : nullptr, bits(out), out.stride(0), out.stride(1), bits(h_n),
                     bits(c_n), training ? bits(gates) : nullptr, gates.stride(0), training ? gates.stride(1) : 0,
                     training ? bits(cells) : nullptr, cells.stride(0), training ? cells.stride(1) : 0};
  a.panel_threads = panel_threads_for(D, B, H, /*bf16=*/true);
  run_row_tasks(a, D, avx512bf16::forward_rows_bf16, avx512bf16::forward_scratch_floats_bf16);
  return {out, h_n, c_n, gates, cells};
}
#endif

inline bool runs_panels(CpuKernel kernel, const LstmSizes& s, at::ScalarType dtype) {
  return FASTMSC_PANELS && kernel != CpuKernel::kBlas && dtype == at::kFloat && !s.projected;
}

struct CpuBackend {
  using Guard = NoDeviceGuard;
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return cpu_empty(sizes, options); }
  static bool reads_time_major(const LstmSizes& s, at::ScalarType dtype) { return runs_panels(cpu_kernel(), s, dtype); }
  static constexpr bool kReturnsTimeMajor = true;
  static at::Tensor forward(const LstmSizes& s, const LstmForward& f, const at::Tensor& w_ih_in,
                            const c10::optional<at::Tensor>& bias_in, const c10::optional<at::Tensor>& h0,
                            bool training, const c10::optional<at::Tensor>& w_hr_in);
  static void backward(LstmBackward& bw);
};

at::Tensor CpuBackend::forward(const LstmSizes& s, const LstmForward& f, const at::Tensor& w_ih_in,
                               const c10::optional<at::Tensor>& bias_in, const c10::optional<at::Tensor>& h0,
                               bool training, const c10::optional<at::Tensor>& w_hr_in) {
  const at::Tensor w_ih = w_ih_in.contiguous();
  const at::Tensor bias = present(bias_in) ? bias_in->contiguous() : at::Tensor();
  const at::Tensor w_hr = s.projected ? w_hr_in->contiguous() : at::Tensor();
  // The activated gates for the backward, written by the forward pass.
  const at::Tensor gates =
      training ? empty_in_order(&cpu_empty, s.batch, s.steps, s.directions * 4 * s.hidden, f.x.options(), f.time_major)
               : at::empty({0}, f.x.options());
  const int64_t* lens_ptr = ptr_or_null<int64_t>(f.lens);
  // An empty batch has nothing to compute (and the step chunking divides by the batch): the outputs are empty.
  if (s.batch == 0) return gates;
#if FASTMSC_PANELS
  const CpuKernel kernel = cpu_kernel();
  if (runs_panels(kernel, s, f.x.scalar_type())) {
    panel_forward(kernel, s, f, w_ih, bias, present(h0), gates, training);
    return gates;
  }
#endif
  // The BLAS loops read and write batch-first rows: a time-major call runs on batch-first copies.
  const at::Tensor x = f.x.contiguous(), out = f.out.contiguous(), cells = f.cells.contiguous();
  const at::Tensor gates_bf = gates.contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "fastmsc::lstm_fwd", [&] {
    using T = scalar_t;
    forward_impl<T>(s, x.data_ptr<T>(), w_ih.data_ptr<T>(), ptr_or_null<T>(bias), f.w_hh.data_ptr<T>(),
                    ptr_or_null<T>(w_hr), lens_ptr, present(h0), out.data_ptr<T>(), f.h_n.data_ptr<T>(),
                    f.c_n.data_ptr<T>(), training ? gates_bf.data_ptr<T>() : nullptr,
                    training ? cells.data_ptr<T>() : nullptr);
  });
  if (f.time_major) {
    f.out.copy_(out);
    if (training) {
      f.cells.copy_(cells);
      gates.copy_(gates_bf);
    }
  }
  return gates;
}

// ---------------------------------------------------------------------------------------------------

// dh_all (B, T, D*P), with the projection only: the gradient reaching each step's h (zero at padded steps), the
// left factor of dW_hr; w_hr (D, P, H) maps it back to o * tanh(c) through one GEMM per step (into dr, (D, B, H)).
template <typename T>
void backward_loop(const LstmSizes& s, const at::Tensor& w_hh, const T* w_hr, const int64_t* lens, const T* c0,
                   const T* dout, const T* gates, const T* cells, bool need_dstate, T* dgates, T* dh_state, T* dh_rec,
                   T* dc_state, T* dh_all, T* dr) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, G = 4 * H, R = s.proj;
  const int64_t ld_gates = T_ * D * G, ld_state = T_ * D * H, ld_out = T_ * D * R;
  const bool projected = w_hr != nullptr;
  std::vector<T> zeros(std::max(H, R), T(0));
  const T* zero_row = zeros.data();

  for_each_direction(D, [&](int64_t d) {
    const T* w = w_hh.data_ptr<T>() + d * G * R;
    T* dhs = dh_state + d * B * R;
    T* dhr = dh_rec + d * B * R;
    T* dcs = dc_state + d * B * H;
    T* dr_d = projected ? dr + d * B * H : nullptr;
    const PackedWeightGemm<T> recurrent(B, R, G, w, R, /*w_transposed=*/false, ld_gates);
    std::optional<PackedWeightGemm<T>> unproject;
    if (projected) unproject.emplace(B, H, R, w_hr + d * R * H, H, /*w_transposed=*/false, ld_out);
    // Backward walks the forward order in reverse. "next" is the step the forward ran after t (handled
    // just before in this loop), "prev" the one it ran before t.
    for (int64_t step = T_ - 1; step >= 0; --step) {
      const int64_t t = d == 0 ? step : T_ - 1 - step;
      const int64_t t_next = d == 0 ? t + 1 : t - 1;
      const int64_t t_prev = d == 0 ? t - 1 : t + 1;
      T* dg_t = dgates + t * D * G + d * G;
      T* dh_t = projected ? dh_all + t * D * R + d * R : nullptr;
      // dh reaching h_t: from the recurrent GEMM of the step handled before, else the carried value (the h_n
      // gradient before a sequence's last step, or a finished sequence's h0 gradient); a padded step after which
      // the sequence is still running (the reverse direction's padding) carries the GEMM's value on.
      // Without projection the row kernel adds dout to it; with it, dh_carry + dout must first go back through
      // w_hr (one GEMM for all rows), so a separate pass forms that sum and keeps it for dW_hr.
      auto carry = [&](int64_t b, int64_t len, bool next_valid) -> const T* {
        const T* dh_carry = next_valid ? dhr + b * R : dhs + b * R;
        if (t >= len && next_valid) std::copy(dh_carry, dh_carry + R, dhs + b * R);
        return dh_carry;
      };
      if (projected) {
        at::parallel_for(0, B, row_grain(R), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t len = lens != nullptr ? lens[b] : T_;
            const bool next_valid = step < T_ - 1 && t_next >= 0 && t_next < len;
            const T* dh_carry = carry(b, len, next_valid);
            T* dh_row = dh_t + b * ld_out;
            if (t >= len) {
              std::fill(dh_row, dh_row + R, T(0));
              continue;
            }
            const T* dout_row = dout != nullptr ? dout + b * ld_out + t * D * R + d * R : zero_row;
            for (int64_t j = 0; j < R; ++j) dh_row[j] = dh_carry[j] + dout_row[j];
          }
        });
        unproject->run(dh_t, ld_out, T(0), dr_d, H);
      }
      at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t len = lens != nullptr ? lens[b] : T_;
          const bool next_valid = step < T_ - 1 && t_next >= 0 && t_next < len;
          T* dg_row = dg_t + b * ld_gates;
          if (t >= len) {
            std::fill(dg_row, dg_row + G, T(0));
            if (!projected) carry(b, len, next_valid);
            continue;
          }
          const bool first = d == 0 ? t == 0 : t == len - 1;
          const int64_t offset = b * ld_state + d * H;
          const T* c_prev = first ? (c0 != nullptr ? c0 + (d * B + b) * H : zero_row) : cells + offset + t_prev * D * H;
          const T* dh = projected ? dr_d + b * H : carry(b, len, next_valid);
          const T* dout_row = projected || dout == nullptr ? zero_row : dout + b * ld_out + t * D * R + d * R;
          Rows<T>::bwd(gates + b * ld_gates + t * D * G + d * G, cells + offset + t * D * H, c_prev, dh, dout_row,
                       dcs + b * H, dg_row, H);
        }
      });
      // dh_{t_prev} = dG_t @ w_hh; the very last one is the h0 gradient, needed only when asked for.
      if (step > 0 || need_dstate) {
        recurrent.run(dg_t, ld_gates, T(0), dhr, R);
      }
    }
    if (need_dstate) {
      // h0 gradient: the last GEMM's result where the forward's first step was valid for the row, else
      // the value carried when the sequence finished.
      const int64_t t_first = d == 0 ? 0 : T_ - 1;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = lens != nullptr ? lens[b] : T_;
        if (t_first < len) std::copy(dhr + b * R, dhr + (b + 1) * R, dhs + b * R);
      }
    }
  });
}

// With the projection, for dW_hr: o * tanh(c) of every (b, t, d), the value the forward projected, recomputed
// from the saved gates and cells (with the forward's tanh); zero at padded steps.
template <typename T>
void fill_unprojected(const LstmSizes& s, const int64_t* lens, const T* gates, const T* cells, T* hidden) {
  const int64_t B = s.batch, T_ = s.steps, H = s.hidden, D = s.directions, G = 4 * H;
  at::parallel_for(0, B * T_, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T_, t = i % T_;
      T* dst = hidden + i * D * H;
      if (lens != nullptr && t >= lens[b]) {
        std::fill(dst, dst + D * H, T(0));
        continue;
      }
      for (int64_t d = 0; d < D; ++d) {
        const T* o = gates + i * D * G + d * G + 3 * H;
        const T* c = cells + i * D * H + d * H;
        for (int64_t j = 0; j < H; ++j) dst[d * H + j] = o[j] * tanh_(c[j]);
      }
    }
  });
}

// h_prev for every (b, t, d): the hidden state (R wide) each step's recurrent GEMM used (h0 or zero at a
// sequence's first step), zero at padded steps so that dW_hh = dG^T h_prev is one GEMM per direction.
template <typename T>
void fill_h_prev(const LstmSizes& s, const int64_t* lens, const T* out, const T* h0, T* h_prev) {
  const int64_t B = s.batch, T_ = s.steps, R = s.proj, D = s.directions;
  const int64_t ld = T_ * D * R;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = lens != nullptr ? lens[b] : T_;
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t d = 0; d < D; ++d) {
          T* dst = h_prev + b * ld + t * D * R + d * R;
          if (t >= len) {
            std::fill(dst, dst + R, T(0));
            continue;
          }
          const bool first = d == 0 ? t == 0 : t == len - 1;
          if (first) {
            if (h0 != nullptr) {
              std::copy(h0 + (d * B + b) * R, h0 + (d * B + b + 1) * R, dst);
            } else {
              std::fill(dst, dst + R, T(0));
            }
          } else {
            const int64_t t_prev = d == 0 ? t - 1 : t + 1;
            const T* src = out + b * ld + t_prev * D * R + d * R;
            std::copy(src, src + R, dst);
          }
        }
      }
    }
  });
}

#if FASTMSC_PANELS
// The gate gradients live only until finish_backward: in the thread's scratch memory where that is kept.
// In `dtype` (float32, or bf16 for the bf16 backward) and bw's row order; fresh memory where the scratch is not kept
// (bw.dgates as prepare_backward made it, where it has that dtype).
inline void use_scratch_gate_gradients(LstmBackward& bw, at::ScalarType dtype) {
  const LstmSizes& s = bw.s;
  const int64_t B = s.batch, T_ = s.steps, DG = s.directions * 4 * s.hidden;
  const int64_t floats = (B * T_ * DG * static_cast<int64_t>(c10::elementSize(dtype)) + 3) / 4;
  const at::TensorOptions options = bw.x.options().dtype(dtype);
  if (floats <= kScratchKeepFloats) {
    at::Tensor unused;
    const std::vector<int64_t> strides = bw.time_major ? std::vector<int64_t>{DG, B * DG, 1}
                                                       : std::vector<int64_t>{T_ * DG, DG, 1};
    bw.dgates = at::from_blob(scratch_floats(kSlotGateGrads, floats, unused), {B, T_, DG}, strides, options);
    // scratch_floats poisons float32 words: in bf16 that is a NaN and a zero
    if (poisoning() && dtype != at::kFloat) bw.dgates.fill_(std::numeric_limits<float>::quiet_NaN());
  } else if (!bw.dgates.defined() || bw.dgates.scalar_type() != dtype) {
    bw.dgates = empty_in_order(&cpu_empty, B, T_, DG, options, bw.time_major);
  }
}
#endif

void CpuBackend::backward(LstmBackward& bw) {
  const LstmSizes& s = bw.s;
  const bool need_dstate = bw.need_dstate, need_dweights = bw.need_dweights;
  const int64_t* lens_ptr = ptr_or_null<int64_t>(bw.lens);
#if FASTMSC_PANELS
  const CpuKernel kernel = cpu_kernel();
  if (runs_panels(kernel, s, bw.x.scalar_type())) {
    use_scratch_gate_gradients(bw, at::kFloat);
    // The bias gradient summed per row by the loop, while dG is in cache: summed over the B*T rows afterwards, it
    // was another pass over all of dG (0.6 ms of the 20 ms step at B=128 T=150 H=32, bidirectional).
    at::Tensor dbias_rows;
    if (bw.has_bias && need_dweights) dbias_rows = at::zeros({s.directions, s.batch, 4 * s.hidden}, bw.x.options());
    panel_backward<float>(kernel, bw, dbias_rows.defined() ? dbias_rows.data_ptr<float>() : nullptr);
    if (dbias_rows.defined()) bw.dbias = dbias_rows.sum(1).view({-1});
    panel_weight_gradients(kernel, bw);
    return;
  }
#endif
  if (bw.time_major) {  // the BLAS loops read and write batch-first rows
    bw.time_major = false;
    for (at::Tensor* t : {&bw.x, &bw.out, &bw.gates, &bw.cells, &bw.dout}) {
      if (t->defined()) *t = t->contiguous();
    }
    bw.dgates = bw.empty({s.batch, s.steps, s.directions * 4 * s.hidden}, bw.x.options());
    if (s.projected) bw.dh_all = bw.empty({s.batch, s.steps, s.directions * s.proj}, bw.x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(bw.x.scalar_type(), "fastmsc::lstm_bwd", [&] {
    using T = scalar_t;
    backward_loop<T>(s, bw.w_hh, ptr_or_null<T>(bw.w_hr), lens_ptr, ptr_or_null<T>(bw.c0), ptr_or_null<T>(bw.dout),
                     bw.gates.data_ptr<T>(), bw.cells.data_ptr<T>(), need_dstate, bw.dgates.data_ptr<T>(),
                     bw.dh_state.data_ptr<T>(), bw.dh_rec.data_ptr<T>(), bw.dc_state.data_ptr<T>(),
                     ptr_or_null<T>(bw.dh_all), ptr_or_null<T>(bw.dr));
    if (need_dweights) {
      allocate_weight_inputs(bw);
      fill_h_prev<T>(s, lens_ptr, bw.out.data_ptr<T>(), ptr_or_null<T>(bw.h0), bw.h_prev.data_ptr<T>());
      if (s.projected) {
        fill_unprojected<T>(s, lens_ptr, bw.gates.data_ptr<T>(), bw.cells.data_ptr<T>(),
                            bw.unprojected.data_ptr<T>());
      }
    }
  });
}

#if FASTMSC_PANELS
// ---------------------------------------------------------------------------------------------------
// The bf16 backward (AVX512_BF16). The BPTT loop reads the saved bf16 state in place and computes the cell math in
// float32; it rounds each step's gate gradients to bf16, as oneDNN's bf16 LSTM backward keeps them, and multiplies
// them by w_hh's bf16 pairs for the recurrent product (vdpbf16ps: float32 sums, twice the float32 rate); dx, dW_ih
// and dW_hh multiply the same rounded gradients after the loop. The rounding, 2^-8 of a gradient, is what the bf16
// gradients get when they are returned anyway.

void pair_gemm(const PairGemm& g) {
  gemm_on_threads(g, 2, [&](int64_t begin, int64_t end) { avx512bf16::pair_gemm_rows(g, begin, end); });
}

// dx = dG · w_ih, dW_ih = dGᵀ · x and dW_hh = dGᵀ · h_prev (float32, into bw) from the loop's gate gradients rounded
// to bf16 (bw.dgates): its rows are dx's factor as they are (pairs along a row); the weight gradients' factor pairs
// rows, interleaved into (rows / 2 x D*4H) words chunk by chunk, in chunks that fit the kept scratch memory (whole, at
// B=128 T=1000 H=256 both directions, that copy and the packed x and h_prev were 600 MB of fresh memory per call,
// faulted in on every call). The weight gradients accumulate over the chunks.
// Per direction one product gives both weight gradients: dGᵀ_d · [x | h_prev_d] (4H x (I' + H), I' = I rounded up to
// whole vectors), whose columns are dW_ih_d's and then dW_hh_d's. At I = H = 32 the two products on their own filled
// half of each 64-column panel and read the gate gradients twice; together they fill whole panels and read them once.
void pair_weight_gradients(LstmBackward& bw) {
  using Bits = uint16_t;
  const LstmSizes& s = bw.s;
  const int64_t N = s.batch * s.steps, I = s.input, H = s.hidden, D = s.directions, G = 4 * H, DG = D * G;
  const at::TensorOptions options = bw.x.options().dtype(at::kFloat);
  const Bits* dg = elements_or_null<const Bits>(bw.dgates);  // (N, DG) memory rows in bw's order
  at::Tensor holders[3];
  if (bw.need_dx) {
    const at::Tensor w_ih = bw.w_ih.contiguous();
    const Bits* w = elements_or_null<const Bits>(w_ih);
    uint32_t* w_p = reinterpret_cast<uint32_t*>(scratch_floats(kSlotWih, pair_panels_words(DG, I), holders[0]));
    pack_pair_panels(DG, I, w_p, [&](int64_t k) { return w + k * I; });
    bw.dx = empty_in_order(&cpu_empty, s.batch, s.steps, I, options, bw.time_major);  // rows in dG's order
    pair_gemm({N, I, DG / 2, reinterpret_cast<const uint32_t*>(dg), DG / 2, 1, w_p, bw.dx.data_ptr<float>(), I,
               false});
  }
  if (!bw.need_dweights) return;
  const int64_t I_padded = (I + 15) / 16 * 16, columns = I_padded + H;  // of [x | h_prev]
  if (N == 0) {  // no rows: zero weight gradients
    bw.dw_ih = at::zeros({DG, I}, options);
    bw.dw_hh = at::zeros({D, G, H}, options);
    return;
  }
  // Rows per chunk, even: a pair never straddles two.
  const int64_t widest = std::max(DG, (columns + 63) / 64 * 64);  // words per pair row: dG, [x | h_prev]
  const int64_t rows_wanted = weight_gradient_chunk_rows(2 * kScratchKeepFloats / widest);
  const int64_t chunk = std::max<int64_t>(2, std::min(rows_wanted, N + 1) & ~int64_t{1});
  uint32_t* dg_pairs = reinterpret_cast<uint32_t*>(scratch_floats(kSlotGradPairs, chunk / 2 * DG, holders[1]));
  uint32_t* xh = reinterpret_cast<uint32_t*>(
      scratch_floats(kSlotTasks, pair_panels_words(std::min(chunk, N), columns), holders[2]));
  const Bits* x = elements_or_null<const Bits>(bw.x);  // dense in bw's order: memory rows pair with dG's
  const HPrevRows<Bits> h_prev(s, ptr_or_null<int64_t>(bw.lens), bw.out, elements_or_null<const Bits>(bw.h0), 0);
  at::Tensor dw = cpu_empty({D, G, columns}, options);  // per direction [dW_ih_d | 0 | dW_hh_d]
  constexpr int64_t kPackAhead = 4;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0), pairs = (rows + 1) / 2, end = r0 + rows;
    at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / DG), [&](int64_t begin, int64_t stop) {
      for (int64_t kp = begin; kp < stop; ++kp) {
        const int64_t first = r0 + 2 * kp, second = first + 1;
        avx512bf16::interleave_rows(dg + first * DG, second < end ? dg + second * DG : nullptr, DG,
                                    dg_pairs + kp * DG);
      }
    });
    for (int64_t d = 0; d < D; ++d) {
      HPrevRows<Bits> direction = h_prev;
      direction.d = d;
      at::parallel_for(0, pairs, 256, [&](int64_t begin, int64_t stop) {
        for (int64_t kp = begin; kp < stop; ++kp) {
          const int64_t first = r0 + 2 * kp, second = first + 1;
          const bool paired = second < end;
          // The rows kPackAhead pairs on: without, the packing waits on their loads (0.3 ms of the 6 ms backward at
          // B=128 T=150 H=32, bidirectional).
          const int64_t ahead = first + 2 * kPackAhead;
          if (ahead + 1 < end) {
            prefetch_lines(x + ahead * I, 2 * I * sizeof(Bits));
            for (const Bits* h : {direction(ahead), direction(ahead + 1)}) {
              if (h != nullptr) prefetch_lines(h, H * sizeof(Bits));
            }
          }
          avx512bf16::pack_pair_row(x + first * I, paired ? x + second * I : nullptr, I, direction(first),
                                    paired ? direction(second) : nullptr, H, xh + kp * 64, pairs * 64);
        }
      });
      pair_gemm({G, columns, pairs, dg_pairs + d * G, 1, DG, xh, dw.data_ptr<float>() + d * G * columns, columns,
                 r0 > 0});
    }
  }
  bw.dw_ih = cpu_contiguous_copy(dw.narrow(2, 0, I)).view({DG, I});
  bw.dw_hh = cpu_contiguous_copy(dw.narrow(2, I_padded, H));
}

// fastmsc::lstm_bwd_bf16: lstm_bwd for a layer lstm_fwd_bf16 ran (no projection), on its bf16 saved state as it is.
// The gradients come back float32, as lstm_bwd's widened path returns them.
LstmGrads lstm_bwd_bf16_cpu(const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& grad_h_n,
                            const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& x, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, bool has_bias, const c10::optional<at::Tensor>& h0,
                            const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
                            const at::Tensor& out, const at::Tensor& gates, const at::Tensor& cells, bool need_dx,
                            bool need_dweights, bool need_dstate) {
  TORCH_CHECK(cpu_bf16_kernel(), "fastmsc::lstm_bwd_bf16: needs a CPU with AVX512_BF16 (and the AVX-512 kernels "
              "selected); torch.ops.fastmsc.lstm_cpu_bf16() says whether it runs here");
  const LstmSizes s = check_lstm_args(x, w_ih, w_hh, c10::nullopt, h0, c0, lengths, c10::nullopt, true);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  LstmBackward bw = prepare_backward(s, grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out,
                                     gates, cells, need_dx, need_dweights, need_dstate, c10::nullopt, &cpu_empty,
                                     /*follow_time_major=*/true, at::kFloat, /*gate_gradients=*/false);
  // The loop's gate gradients go out rounded to bf16, and summed per row for the bias gradient.
  use_scratch_gate_gradients(bw, at::kBFloat16);
  const at::Tensor dbias_rows = at::zeros({s.directions, s.batch, 4 * s.hidden}, bw.dh_state.options());
  if (s.batch != 0) panel_backward<uint16_t>(CpuKernel::kAvx512, bw, dbias_rows.data_ptr<float>());
  if (has_bias) bw.dbias = dbias_rows.sum(1).view({-1});
  // With an empty batch the products run over zero rows: zero weight gradients.
  pair_weight_gradients(bw);
  LstmGrads grads = finish_backward(bw);
  if (need_dx) std::get<0>(grads) = in_order(std::get<0>(grads), is_time_major(x));
  return grads;
}
#endif

// panel_threads_for where the call runs the vectorised recurrence (float32 on the avx512 or avx2 kernel, bf16 on
// AVX512_BF16), else 1.
int64_t shared_panel_threads(int64_t D, int64_t B, int64_t H, bool bf16) {
#if FASTMSC_PANELS
  if (bf16 ? cpu_bf16_kernel() : cpu_kernel() != CpuKernel::kBlas) return panel_threads_for(D, B, H, bf16);
#endif
  (void)D, (void)B, (void)H, (void)bf16;
  return 1;
}

}  // namespace
}  // namespace fastmsc

TORCH_LIBRARY(fastmsc, m) {
  // The code that runs float32 on this CPU: "avx512", "avx2" (the vectorised recurrence) or "blas".
  m.def("lstm_cpu_kernel() -> str", [] { return std::string(fastmsc::cpu_kernel_name(fastmsc::cpu_kernel())); });
  // Whether lstm_fwd_bf16 runs on this CPU (AVX512_BF16).
  m.def("lstm_cpu_bf16() -> bool", [] { return fastmsc::cpu_bf16_kernel(); });
  // The freed CPU buffers kept for reuse (see BlockCache): their bytes, and their release.
  m.def("lstm_cpu_cached_bytes() -> int", [] { return fastmsc::block_cache_bytes(); });
  m.def("lstm_cpu_empty_cache() -> ()", [] { fastmsc::empty_block_cache(); });
  // How many threads split the hidden units of a call's one row task (one direction, few rows) on torch's current
  // thread count, 1 where they do not (see panel_threads_for): in the forward, and in the BPTT loop where H spans more
  // than one of its panels (64 columns at AVX-512, 32 at AVX2).
  m.def("lstm_cpu_panel_threads(int directions, int batch, int hidden, bool bf16) -> int",
        [](int64_t D, int64_t B, int64_t H, bool bf16) { return fastmsc::shared_panel_threads(D, B, H, bf16); });
  // torch.stack of CPU tensors in the memory the op's large tensors take (see lstm_cpu_stack).
  m.def("lstm_cpu_stack(Tensor[] parts) -> Tensor");
  m.def(
      "lstm_fwd_bf16(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? h0, Tensor? c0, Tensor? lengths, "
      "bool training) -> (Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_fwd(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? h0, Tensor? c0, Tensor? lengths, "
      "bool training, Tensor? w_hr=None) -> (Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_bwd(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, Tensor w_hh, "
      "bool has_bias, Tensor? h0, Tensor? c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cells, "
      "bool need_dx, bool need_dweights, bool need_dstate, Tensor? w_hr=None) -> "
      "(Tensor dx, Tensor dw_ih, Tensor dw_hh, Tensor dbias, Tensor dh0, Tensor dc0, Tensor dw_hr)");
  m.def(
      "lstm_bwd_bf16(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, Tensor w_hh, "
      "bool has_bias, Tensor? h0, Tensor? c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cells, "
      "bool need_dx, bool need_dweights, bool need_dstate) -> "
      "(Tensor dx, Tensor dw_ih, Tensor dw_hh, Tensor dbias, Tensor dh0, Tensor dc0, Tensor dw_hr)");
}

TORCH_LIBRARY_IMPL(fastmsc, CPU, m) {
  m.impl("lstm_fwd", &fastmsc::lstm_fwd<fastmsc::CpuBackend>);
  m.impl("lstm_bwd", &fastmsc::lstm_bwd<fastmsc::CpuBackend>);
  m.impl("lstm_cpu_stack", &fastmsc::lstm_cpu_stack);
#if FASTMSC_PANELS
  m.impl("lstm_fwd_bf16", &fastmsc::lstm_fwd_bf16_cpu);
  m.impl("lstm_bwd_bf16", &fastmsc::lstm_bwd_bf16_cpu);
#endif
}
