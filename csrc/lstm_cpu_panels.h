// The float32 CPU recurrence of fastmsc::lstm_fwd / lstm_bwd on x86 vector units, written once and compiled per
// instruction set: lstm_cpu.cpp includes this file inside a namespace per ISA after defining
//   FASTMSC_PANEL_TARGET  the GCC/Clang target attribute of every function here ("avx512f,...", "avx2,fma");
//   FASTMSC_PANEL_WIDTH   floats per vector register (16 or 8).
// There is no include guard on purpose. lstm_cpu.cpp picks the variant at run time from the CPU's features, so one
// binary runs (and is fast) on AVX2 and AVX-512 machines and never executes an instruction the CPU lacks.
//
// Weights are packed once per call into panels: a panel is K rows of kPanel = 4 * kWidth floats, contiguous, so the
// inner loop streams it with aligned-stride vector loads. In the forward a panel holds the i, f, g and o columns of
// the same kWidth hidden units, so a (rows x panel) product leaves in registers every pre-activation those units need:
// the gates, c and h are computed straight from it, without writing the pre-activations to memory. Each thread owns
// whole batch rows of one direction for the whole sequence: rows do not interact, so steps need no barrier. (A single
// direction of a few rows is one task, whose hidden units two threads may share instead, meeting once a step: see
// run_steps_on_threads and backward_rows.)
//
// Per step and row block the microkernel does kRows x K x kPanel FMAs from 4 vector loads and kRows broadcasts per
// k: 24 FMAs to 10 loads at AVX-512 (kRows = 6), 8 to 6 at AVX2 (kRows = 2), so FMA-bound while the panel sits in
// L1/L2. The loop order (panel outer, row blocks inner) keeps one panel (K x kPanel x 4 bytes: 32 KB at K = 128)
// cached across all row blocks of the thread.

#define FASTMSC_PANEL_INLINE __attribute__((target(FASTMSC_PANEL_TARGET), always_inline)) inline
#if FASTMSC_PANEL_BF16
// The bf16 variant runs the bf16 layers' forward and backward only: the float32 entry points compiled along with it go
// unused there.
#define FASTMSC_PANEL_FN __attribute__((target(FASTMSC_PANEL_TARGET), unused)) FASTMSC_VECTORIZABLE
#else
#define FASTMSC_PANEL_FN __attribute__((target(FASTMSC_PANEL_TARGET))) FASTMSC_VECTORIZABLE
#endif

constexpr int64_t kWidth = FASTMSC_PANEL_WIDTH;
constexpr int64_t kPanel = 4 * kWidth;
// Rows per microkernel: 4 * kRows accumulators + 4 weight vectors + a broadcast fit the 32 (AVX-512) or 16 (AVX2)
// vector registers without spilling.
constexpr int kRows = kWidth == 16 ? 6 : 2;

#if FASTMSC_PANEL_WIDTH == 16
using Vec = __m512;
FASTMSC_PANEL_INLINE Vec vload(const float* p) { return _mm512_loadu_ps(p); }
FASTMSC_PANEL_INLINE void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
FASTMSC_PANEL_INLINE Vec vbroadcast(float x) { return _mm512_set1_ps(x); }
FASTMSC_PANEL_INLINE Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
FASTMSC_PANEL_INLINE Vec vzero() { return _mm512_setzero_ps(); }
// The first n (0 < n < kWidth) floats; the other lanes read as zero and are not written.
FASTMSC_PANEL_INLINE Vec vload_first(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
FASTMSC_PANEL_INLINE void vstore_first(float* p, Vec v, int64_t n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
// Per 128-bit lane: a's and b's floats 0, 1 interleaved (vunpacklo; 2, 3: vunpackhi); a's floats 0, 1 then b's
// (vpairs_lo; 2, 3: vpairs_hi).
FASTMSC_PANEL_INLINE Vec vunpacklo(Vec a, Vec b) { return _mm512_unpacklo_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vunpackhi(Vec a, Vec b) { return _mm512_unpackhi_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vpairs_lo(Vec a, Vec b) { return _mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)); }
FASTMSC_PANEL_INLINE Vec vpairs_hi(Vec a, Vec b) { return _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)); }
// GCC 12 warns that its own AVX-512 intrinsics read an uninitialised __Y (the _mm512_undefined_ps() they pass as the
// unused merge source): a false positive, silenced around these helpers only (and transpose_tile's, load_units').
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
FASTMSC_PANEL_INLINE Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vfnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
// max(lo, x), min(hi, x): a NaN x comes out as itself (the instructions return their second operand on NaN).
FASTMSC_PANEL_INLINE Vec vmax(Vec lo, Vec x) { return _mm512_max_ps(lo, x); }
FASTMSC_PANEL_INLINE Vec vmin(Vec hi, Vec x) { return _mm512_min_ps(hi, x); }
FASTMSC_PANEL_INLINE Vec vfnms(Vec a, Vec b, Vec c) { return _mm512_fnmsub_ps(a, b, c); }  // -(a * b) - c
// p * 2^n for whole numbers n in [-126, 127] (exact: a change of exponent).
FASTMSC_PANEL_INLINE Vec vscale(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
// The 14-bit reciprocal estimate (vrcp14ps).
FASTMSC_PANEL_INLINE Vec vrcp_estimate(Vec d) { return _mm512_rcp14_ps(d); }
#pragma GCC diagnostic pop
#elif FASTMSC_PANEL_WIDTH == 8
using Vec = __m256;
FASTMSC_PANEL_INLINE Vec vload(const float* p) { return _mm256_loadu_ps(p); }
FASTMSC_PANEL_INLINE void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
FASTMSC_PANEL_INLINE Vec vbroadcast(float x) { return _mm256_set1_ps(x); }
FASTMSC_PANEL_INLINE Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
FASTMSC_PANEL_INLINE Vec vzero() { return _mm256_setzero_ps(); }
FASTMSC_PANEL_INLINE __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTMSC_PANEL_INLINE Vec vload_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
FASTMSC_PANEL_INLINE void vstore_first(float* p, Vec v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
FASTMSC_PANEL_INLINE Vec vunpacklo(Vec a, Vec b) { return _mm256_unpacklo_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vunpackhi(Vec a, Vec b) { return _mm256_unpackhi_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vpairs_lo(Vec a, Vec b) { return _mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)); }
FASTMSC_PANEL_INLINE Vec vpairs_hi(Vec a, Vec b) { return _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)); }
FASTMSC_PANEL_INLINE Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
FASTMSC_PANEL_INLINE Vec vfnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
FASTMSC_PANEL_INLINE Vec vmax(Vec lo, Vec x) { return _mm256_max_ps(lo, x); }
FASTMSC_PANEL_INLINE Vec vmin(Vec hi, Vec x) { return _mm256_min_ps(hi, x); }
FASTMSC_PANEL_INLINE Vec vfnms(Vec a, Vec b, Vec c) { return _mm256_fnmsub_ps(a, b, c); }
// 2^n built in the exponent bits.
FASTMSC_PANEL_INLINE Vec vscale(Vec p, Vec n) {
  return vmul(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
}
// The 12-bit reciprocal estimate (vrcpps). It gives 0 where the reciprocal is below about 2^-126 (sigmoid(x) for
// x < -87.3 then comes out 0 rather than a subnormal of at most 1.2e-38, as AVX-512's estimate and the scalar code give).
FASTMSC_PANEL_INLINE Vec vrcp_estimate(Vec d) { return _mm256_rcp_ps(d); }
#else
#error "FASTMSC_PANEL_WIDTH must be 16 or 8"
#endif

// dst[c * dst_ld + r] = src[r * src_ld + c] for r, c < kWidth: one square tile through registers (the weight packing's
// transpose; scalar, it took a third of a small call). Within each 128-bit lane, rows are interleaved in pairs and then
// 4 x 4 blocks transposed, so that r[4g + m] holds in lane L column 4L + m of rows 4g..4g+3; then the lanes move into
// place (AVX-512: 4-lane, then 8-lane blocks; AVX2: the two halves).
// GCC 12 warns that its own AVX-512 unpack and shuffle intrinsics read an uninitialised __Y (the _mm512_undefined_ps()
// they pass as the unused merge source): a false positive, silenced here only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
FASTMSC_PANEL_FN void transpose_tile(const float* __restrict src, int64_t src_ld, float* __restrict dst, int64_t dst_ld) {
  Vec r[kWidth], t[kWidth];
  for (int i = 0; i < kWidth; ++i) r[i] = vload(src + i * src_ld);
  for (int i = 0; i < kWidth; i += 2) {
    t[i] = vunpacklo(r[i], r[i + 1]);
    t[i + 1] = vunpackhi(r[i], r[i + 1]);
  }
  for (int i = 0; i < kWidth; i += 4) {
    r[i] = vpairs_lo(t[i], t[i + 2]);
    r[i + 1] = vpairs_hi(t[i], t[i + 2]);
    r[i + 2] = vpairs_lo(t[i + 1], t[i + 3]);
    r[i + 3] = vpairs_hi(t[i + 1], t[i + 3]);
  }
#if FASTMSC_PANEL_WIDTH == 16
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) vstore(dst + i * dst_ld, r[i]);
#else
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
    t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) vstore(dst + i * dst_ld, t[i]);
#endif
}
#pragma GCC diagnostic pop

// acc[r][s] += sum over k < K of a[r][k] * panel[k][s * kWidth ...]: rows a[r] (K floats each) times one panel.
// a[r][k * a_step]: a_step = 1 for rows of a row-major A, the row stride for the columns of a transposed one.
// w_ld: the panel's row stride, kPanel when packed, the matrix's row stride when read in place. NV < 4: only the first
// NV vectors of the panel (a last panel whose remaining columns are zero padding), acc[r][NV..3] untouched.
template <int M, int NV = 4>
FASTMSC_PANEL_INLINE void panel_product(const float* const (&a)[M], int64_t K, const float* __restrict panel,
                                        Vec (&acc)[M][4], int64_t a_step = 1, int64_t w_ld = kPanel) {
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * w_ld;
    Vec wv[NV];
    for (int s = 0; s < NV; ++s) wv[s] = vload(w + s * kWidth);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const Vec v = vbroadcast(a[r][k * a_step]);
      for (int s = 0; s < NV; ++s) acc[r][s] = vfma(v, wv[s], acc[r][s]);
    }
  }
}

// panel_product over the vectors that hold any of a panel's n columns.
template <int M>
FASTMSC_PANEL_INLINE void panel_product_columns(int64_t n, const float* const (&a)[M], int64_t K,
                                                const float* __restrict panel, Vec (&acc)[M][4], int64_t a_step,
                                                int64_t w_ld) {
  switch ((n + kWidth - 1) / kWidth) {
    case 1: panel_product<M, 1>(a, K, panel, acc, a_step, w_ld); break;
    case 2: panel_product<M, 2>(a, K, panel, acc, a_step, w_ld); break;
    case 3: panel_product<M, 3>(a, K, panel, acc, a_step, w_ld); break;
    default: panel_product<M, 4>(a, K, panel, acc, a_step, w_ld); break;
  }
}

template <int M>
FASTMSC_PANEL_INLINE void load_rows(const float* const (&src)[M], Vec (&acc)[M][4]) {
  for (int r = 0; r < M; ++r) {
    for (int s = 0; s < 4; ++s) acc[r][s] = src[r] != nullptr ? vload(src[r] + s * kWidth) : vzero();
  }
}

// Runs BLOCK<M>::run(first_row, args...) over [0, n) in blocks of at most kRows rows, M the block's size (a
// compile-time constant, so that the accumulators stay in registers). Struct templates rather than lambdas: a lambda
// does not inherit its enclosing function's target attribute, and the intrinsics need it.
template <template <int> class Block, typename... Args>
FASTMSC_PANEL_INLINE void for_row_blocks(int64_t n, Args&&... args) {
  int64_t r = 0;
  for (; r + kRows <= n; r += kRows) Block<kRows>::run(r, args...);
  switch (n - r) {
    case 1: Block<1>::run(r, args...); break;
#if FASTMSC_PANEL_WIDTH == 16
    case 2: Block<2>::run(r, args...); break;
    case 3: Block<3>::run(r, args...); break;
    case 4: Block<4>::run(r, args...); break;
    case 5: Block<5>::run(r, args...); break;
#endif
    default: break;
  }
}

// The gate math below (the vectorised cell_forward and cell_backward of lstm_gates.h) works on arrays of N vectors, one
// stage of the computation at a time across all of them (loops the compiler unrolls): N independent chains of dependent
// operations side by side.

// 1 / (1 + exp(-x[j])) = sigmoid(x[j]), in place, with exp_vectorizable's (lstm_gates.h) clamp, reduction and
// polynomial; the negation is folded into the reduction. The reciprocal is the estimate and Newton steps, one after
// AVX-512's 14-bit estimate, two after AVX2's 12-bit one (one would leave about a float ulp more): a division costs
// several times more (five per vector of hidden units were most of the cell's time, as long as the products at H = 32).
template <int N>
FASTMSC_PANEL_INLINE void vsigmoid(Vec (&x)[N]) {
  Vec n[N], r[N], p[N];
  const Vec one = vbroadcast(1.0f), shifter = vbroadcast(12582912.0f);
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) x[j] = vmin(vbroadcast(87.0f), vmax(vbroadcast(-88.0f), x[j]));  // -x in [-87, 88]
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) n[j] = vsub(vfma(x[j], vbroadcast(-1.44269504088896341f), shifter), shifter);
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) r[j] = vfnms(n[j], vbroadcast(0.693359375f), x[j]);  // -x - n * ln2 in two parts
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) r[j] = vfnma(n[j], vbroadcast(-2.12194440e-4f), r[j]);
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vfma(vbroadcast(1.9875691500e-4f), r[j], vbroadcast(1.3981999507e-3f));
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vfma(p[j], r[j], vbroadcast(8.3334519073e-3f));
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vfma(p[j], r[j], vbroadcast(4.1665795894e-2f));
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vfma(p[j], r[j], vbroadcast(1.6666665459e-1f));
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vfma(p[j], r[j], vbroadcast(5.0000001201e-1f));
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vadd(vfma(p[j], vmul(r[j], r[j]), r[j]), one);
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) p[j] = vadd(one, vscale(p[j], n[j]));  // 1 + exp(-x)
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) x[j] = vrcp_estimate(p[j]);
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) x[j] = vfma(x[j], vfnma(p[j], x[j], one), x[j]);
  if constexpr (kWidth == 8) {
#pragma GCC unroll 32
    for (int j = 0; j < N; ++j) x[j] = vfma(x[j], vfnma(p[j], x[j], one), x[j]);
  }
}

// tanh_ (lstm_gates.h) of each x[j], in place: 2 * sigmoid(2x) - 1.
template <int N>
FASTMSC_PANEL_INLINE void vtanh(Vec (&x)[N]) {
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) x[j] = vadd(x[j], x[j]);
  vsigmoid(x);
#pragma GCC unroll 32
  for (int j = 0; j < N; ++j) x[j] = vfma(vbroadcast(2.0f), x[j], vbroadcast(-1.0f));
}

// cell_forward (lstm_gates.h) of kWidth hidden units from their i, f, g, o pre-activations (bias included).
struct CellVec {
  Vec i, f, g, o, c, h;
};

// The cells of G rows at once: z[r] the i, f, g, o pre-activations of row r, c_prev[r] its cell state.
template <int G>
FASTMSC_PANEL_INLINE void cell_group(const Vec (*z)[4], const Vec* c_prev, CellVec* v) {
  Vec gates[4 * G];
#pragma GCC unroll 32
  for (int r = 0; r < G; ++r) {
    gates[4 * r] = z[r][0];
    gates[4 * r + 1] = z[r][1];
    gates[4 * r + 2] = vadd(z[r][2], z[r][2]);  // tanh(zg) = 2 * sigmoid(2 zg) - 1
    gates[4 * r + 3] = z[r][3];
  }
  vsigmoid(gates);
  Vec tanh_c[G];
#pragma GCC unroll 32
  for (int r = 0; r < G; ++r) {
    v[r].i = gates[4 * r];
    v[r].f = gates[4 * r + 1];
    v[r].g = vfma(vbroadcast(2.0f), gates[4 * r + 2], vbroadcast(-1.0f));
    v[r].o = gates[4 * r + 3];
    v[r].c = vfma(v[r].f, c_prev[r], vmul(v[r].i, v[r].g));
    tanh_c[r] = v[r].c;
  }
  vtanh(tanh_c);
#pragma GCC unroll 32
  for (int r = 0; r < G; ++r) v[r].h = vmul(v[r].o, tanh_c[r]);
}

// Rows whose cells run side by side: 8 chains of gate math (4 gates each) keep the vector units busy; more spill.
constexpr int kCellGroup = 2;

// The cells of M rows, kCellGroup at a time.
template <int M, int R0 = 0>
FASTMSC_PANEL_INLINE void cell_vectors(const Vec (&z)[M][4], const Vec (&c_prev)[M], CellVec (&v)[M]) {
  constexpr int G = std::min(kCellGroup, M - R0);
  cell_group<G>(z + R0, c_prev + R0, v + R0);
  if constexpr (R0 + G < M) cell_vectors<M, R0 + G>(z, c_prev, v);
}

// The first n (0 < n <= kWidth) floats at p; the other lanes zero.
FASTMSC_PANEL_INLINE Vec load_units(const float* p, int64_t n) { return n == kWidth ? vload(p) : vload_first(p, n); }

// The first n (0 < n <= kWidth) floats of v at p; a whole vector takes the plain store.
FASTMSC_PANEL_INLINE void store_units(float* p, Vec v, int64_t n) {
  if (n == kWidth) {
    vstore(p, v);
  } else {
    vstore_first(p, v, n);
  }
}

#if FASTMSC_PANEL_BF16
// ---------------------------------------------------------------------------------------------------
// bfloat16 forward on AVX512_BF16 (see PanelForwardBf16, lstm_cpu.cpp). Products in bf16 with float32 sums
// (vdpbf16ps: two products per lane and instruction, twice the float32 rate), as oneDNN's bf16 RNN computes them;
// the cell state, the cell math and the bias in float32; h rounded to bf16 once per step, which is both the output
// and the next step's product input. Weights are packed as bf16 pairs: panel p, pair kp holds (w[2kp], w[2kp + 1]) of
// each of its kPanel columns, zero past K.

using Bits = uint16_t;  // a bfloat16, as stored

// acc[r][s] += sum over k < K of a[r][k] * panel(k, s * kWidth ...), a and the panel bf16.
template <int M>
FASTMSC_PANEL_INLINE void panel_product_bf16(const Bits* const (&a)[M], int64_t K, const Bits* __restrict panel,
                                             Vec (&acc)[M][4]) {
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp <= pairs; ++kp) {
    if (kp == pairs && K % 2 == 0) break;
    const Bits* w = panel + kp * kPanel * 2;
    __m512bh wv[4];
    for (int s = 0; s < 4; ++s) wv[s] = (__m512bh)_mm512_loadu_si512(w + s * kWidth * 2);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      uint32_t bits = a[r][2 * kp];
      if (kp < pairs) std::memcpy(&bits, a[r] + 2 * kp, sizeof(bits));  // the last of an odd K pairs with zero
      const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
      for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], v, wv[s]);
    }
  }
}

// acc[r][s] += sum over pairs kp < pairs of a[r][kp * a_ks] · panel(kp, s * kWidth ...), the first NV vectors.
template <int M, int NV>
FASTMSC_PANEL_INLINE void pair_product(const uint32_t* const (&a)[M], int64_t a_ks, int64_t pairs,
                                       const uint32_t* __restrict panel, Vec (&acc)[M][4]) {
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint32_t* w = panel + kp * kPanel;
    __m512bh wv[NV];
    for (int s = 0; s < NV; ++s) wv[s] = (__m512bh)_mm512_loadu_si512(w + s * kWidth);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r][kp * a_ks]));
      for (int s = 0; s < NV; ++s) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], v, wv[s]);
    }
  }
}

// pair_product over the vectors that hold any of a panel's n columns.
template <int M>
FASTMSC_PANEL_INLINE void pair_product_columns(int64_t n, const uint32_t* const (&a)[M], int64_t a_ks, int64_t pairs,
                                               const uint32_t* __restrict panel, Vec (&acc)[M][4]) {
  switch ((n + kWidth - 1) / kWidth) {
    case 1: pair_product<M, 1>(a, a_ks, pairs, panel, acc); break;
    case 2: pair_product<M, 2>(a, a_ks, pairs, panel, acc); break;
    case 3: pair_product<M, 3>(a, a_ks, pairs, panel, acc); break;
    default: pair_product<M, 4>(a, a_ks, pairs, panel, acc); break;
  }
}

// The first n (0 <= n <= kWidth) bf16 at p, 16 bits per lane (the other lanes zero), and their store. A whole vector
// takes the plain load and store, which on the AMD EPYC measured stream from memory several times faster: interleaving
// 10 MB of gate gradients took 2.6 ms with masked loads and stores, 1.6-1.9 ms with masked loads only, 0.5 ms with
// neither; a plain read of 10 MB through 16-bit masked loads took 1.5x as long as through plain ones.
FASTMSC_PANEL_INLINE __m256i load_bits(const Bits* p, int64_t n) {
  return n == kWidth ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                     : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
}

FASTMSC_PANEL_INLINE void store_bits(Bits* p, __m256i v, int64_t n) {
  if (n == kWidth) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
}

// The first n (<= kWidth) floats of v rounded to bf16 (nearest even) at dst.
FASTMSC_PANEL_INLINE void store_bf16(Bits* dst, Vec v, int64_t n) {
  store_bits(dst, (__m256i)_mm512_cvtneps_pbh(v), n);
}

// n (0 < n <= kWidth) floats rounded to bf16 at dst; nothing past n is read.
FASTMSC_PANEL_INLINE void store_bf16(Bits* dst, const float* src, int64_t n) { store_bf16(dst, load_units(src, n), n); }

// load_units and store_units for bf16 storage: widened exactly to float32 (the other lanes zero); rounded.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's false positive, see vadd
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
FASTMSC_PANEL_INLINE Vec load_units(const Bits* p, int64_t n) {
  const __m256i bits = load_bits(p, n);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#pragma GCC diagnostic pop
FASTMSC_PANEL_INLINE void store_units(Bits* p, Vec v, int64_t n) { store_bf16(p, v, n); }

FASTMSC_PANEL_INLINE float bf16_to_float(Bits b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
#endif

// The forward, for float32 (PanelForward) and, on AVX512_BF16, bfloat16 storage (PanelForwardBf16): Args names the
// arguments and E the element type of x, h, the outputs and the saved state. The overloads below are what differs:
// the product (float32 FMAs or bf16 pairs) and a packed panel's size; load_units and store_units read and write E.

FASTMSC_PANEL_INLINE int64_t panel_elements(const float*, int64_t K) { return K * kPanel; }

template <int M>
FASTMSC_PANEL_INLINE void product(const float* const (&a)[M], int64_t K, const float* __restrict panel,
                                  Vec (&acc)[M][4]) {
  panel_product<M>(a, K, panel, acc);
}

// The cell's results v of `units` (<= kWidth) hidden units of one row: c (float32, updated in place); h to h_next (the
// next step's product input) and to out; when training, the activated gates (blocks H apart) to act and c to c_out.
// bf16 storage (E = Bits) rounds each value once, so h_next and out get the same bits.
template <typename E>
FASTMSC_PANEL_INLINE void store_cell(const CellVec& v, int64_t units, float* c, E* h_next, E* out, E* act, int64_t H,
                                     E* c_out, bool training) {
  store_units(c, v.c, units);
  store_units(h_next, v.h, units);
  store_units(out, v.h, units);
  if (training) {
    store_units(act, v.i, units);
    store_units(act + H, v.f, units);
    store_units(act + 2 * H, v.g, units);
    store_units(act + 3 * H, v.o, units);
    store_units(c_out, v.c, units);
  }
}

#if FASTMSC_PANEL_BF16
FASTMSC_PANEL_INLINE int64_t panel_elements(const Bits*, int64_t K) { return (K + 1) / 2 * 2 * kPanel; }

template <int M>
FASTMSC_PANEL_INLINE void product(const Bits* const (&a)[M], int64_t K, const Bits* __restrict panel,
                                  Vec (&acc)[M][4]) {
  panel_product_bf16<M>(a, K, panel, acc);
}

#endif

// A forward task's rows [b_begin, b_begin + rows) of direction d, and their state (shared by the threads that split the
// task's panels, if any: see run_steps_on_threads).
template <typename Args, typename E>
struct ForwardRows {
  const Args& a;
  int64_t d, b_begin, rows;
  int64_t zw;                  // columns of an xproj row: the panels' columns, padded hidden units included
  float* xproj;                // (chunk steps * rows, zw): input projections of the current chunk, bias included
  E* h_prev;                   // (rows, ld)
  E* h_next;                   // (rows, ld)
  float* c_state;              // (rows, ld)
  // Row stride of h_prev, h_next and c_state, in elements: H rounded up to whole cache lines of E, so that threads
  // sharing the rows' panels (run_steps_on_threads) never write into one line of them. (The returned out, gates and
  // cells keep the caller's layout, where a line at the parts' boundary may hold both parts' units.)
  int64_t ld;
  int64_t time_of(int64_t step) const { return d == 0 ? step : a.steps - 1 - step; }
};

// Input projections of rows [r0, r0 + M) of the chunk starting at step `first` (row k * rows + i: row b_begin + i at
// step first + k), panel p.
template <int M>
struct ProjectBlock {
  template <typename Args, typename E, typename W>
  FASTMSC_PANEL_INLINE static void run(int64_t r0, const ForwardRows<Args, E>& f, int64_t first, int64_t p,
                                       const W* w_ih, const float* bias) {
    const Args& a = f.a;
    const E* x_rows[M];
    const float* bias_rows[M];
    for (int r = 0; r < M; ++r) {
      const int64_t k = (r0 + r) / f.rows, b = f.b_begin + (r0 + r) % f.rows;
      x_rows[r] = a.x + b * a.x_sb + f.time_of(first + k) * a.x_st;
      bias_rows[r] = bias != nullptr ? bias + p * kPanel : nullptr;
    }
    Vec acc[M][4];
    load_rows<M>(bias_rows, acc);
    product<M>(x_rows, a.input, w_ih + p * panel_elements(w_ih, a.input), acc);
    for (int r = 0; r < M; ++r) {
      for (int s = 0; s < 4; ++s) vstore(f.xproj + (r0 + r) * f.zw + p * kPanel + s * kWidth, acc[r][s]);
    }
  }
};

// The cells of step `step` for rows [i0, i0 + M) and the hidden units of panel p, from their pre-activations z, and
// their stores. A function of its own, not inlined: inlined, its many constants were hoisted out of the step loop and
// crowded the product's accumulators out of the registers (one spilled accumulator, stored and reloaded on every k,
// made the bf16 product at H = 256 about 15% slower).
template <int M, typename Args, typename E>
__attribute__((target(FASTMSC_PANEL_TARGET), noinline)) void step_cells(const ForwardRows<Args, E>& f, int64_t i0,
                                                                        int64_t step, int64_t p, const Vec (&z)[M][4],
                                                                        bool training) {
  const Args& a = f.a;
  const int64_t H = a.hidden, t = f.time_of(step), d = f.d;
  const int64_t j0 = p * kWidth, units = std::min(kWidth, H - j0);
  // All rows' cells at once (rows past their sequence's end compute one too and drop it), then the stores.
  Vec c_prev[M];
  for (int r = 0; r < M; ++r) c_prev[r] = load_units(f.c_state + (i0 + r) * f.ld + j0, units);
  CellVec cells[M];
  cell_vectors<M>(z, c_prev, cells);
  for (int r = 0; r < M; ++r) {
    const int64_t i = i0 + r, b = f.b_begin + i;
    E* out = a.out + b * a.out_sb + t * a.out_st + d * H + j0;
    E* act = training ? a.gates + b * a.gates_sb + t * a.gates_st + d * 4 * H + j0 : nullptr;
    E* c_out = training ? a.cells + b * a.cells_sb + t * a.cells_st + d * H + j0 : nullptr;
    if (a.lens != nullptr && t >= a.lens[b]) {
      // Past this sequence's end: output zero, state carried unchanged (as packing gives); zero saved gates and
      // cells keep the returned tensors free of stale memory (the backward never reads them).
      std::copy(f.h_prev + i * f.ld + j0, f.h_prev + i * f.ld + j0 + units, f.h_next + i * f.ld + j0);
      std::fill(out, out + units, E(0));
      if (training) {
        for (int64_t g = 0; g < 4; ++g) std::fill(act + g * H, act + g * H + units, E(0));
        std::fill(c_out, c_out + units, E(0));
      }
      continue;
    }
    store_cell(cells[r], units, f.c_state + i * f.ld + j0, f.h_next + i * f.ld + j0, out, act, H, c_out, training);
  }
}

// Step `step` (k-th of its chunk) of rows [i0, i0 + M) for the hidden units of panel p: pre-activations, then the cell.
template <int M>
struct StepBlock {
  template <typename Args, typename E, typename W>
  FASTMSC_PANEL_INLINE static void run(int64_t i0, const ForwardRows<Args, E>& f, int64_t step, int64_t k, int64_t p,
                                       const W* w_hh, bool training) {
    const Args& a = f.a;
    const float* z_rows[M];
    const E* h_rows[M];
    for (int r = 0; r < M; ++r) {
      z_rows[r] = f.xproj + (k * f.rows + i0 + r) * f.zw + p * kPanel;
      h_rows[r] = f.h_prev + (i0 + r) * f.ld;
    }
    Vec acc[M][4];
    load_rows<M>(z_rows, acc);
    if (step > 0 || a.h0 != nullptr) {  // else h = 0
      product<M>(h_rows, a.hidden, w_hh + p * panel_elements(w_hh, a.hidden), acc);
    }
    // A copy for step_cells: handing over acc itself would make memory its home, and the product would store every
    // accumulator on every k.
    Vec z[M][4];
    for (int r = 0; r < M; ++r) {
      for (int s = 0; s < 4; ++s) z[r][s] = acc[r][s];
    }
    step_cells<M>(f, i0, step, p, z, training);
  }
};

// Steps whose input projections are computed together: about 256 rows (steps x batch rows) keep that product efficient
// while the chunk's pre-activations stay in cache for the steps that consume them.
inline int64_t forward_chunk_steps(int64_t rows, int64_t steps) {
  return std::clamp<int64_t>((256 + rows - 1) / rows, 1, steps);
}

// Every step of f's rows for the hidden units of panels [p_begin, p_end), chunk by chunk: the chunk's input
// projections, then its steps. f.h_prev holds h0 (or zeros) and f.c_state c0 on entry; on return f.h_prev holds the last h.
// barrier: the threads that run the other panels of these rows (run_steps_on_threads), met after every step, since
// each step reads the whole h the step before wrote; null when this thread runs every panel.
template <typename Args, typename E, typename W>
FASTMSC_PANEL_INLINE void run_steps(ForwardRows<Args, E>& f, const W* w_ih, const W* w_hh, const float* bias,
                                    int64_t p_begin, int64_t p_end, StepBarrier* barrier) {
  const Args& a = f.a;
  const bool training = a.gates != nullptr;
  const int64_t chunk = forward_chunk_steps(f.rows, a.steps);
  int64_t round = 0;
  for (int64_t first = 0; first < a.steps; first += chunk) {
    const int64_t n = std::min(chunk, a.steps - first);
    for (int64_t p = p_begin; p < p_end; ++p) for_row_blocks<ProjectBlock>(n * f.rows, f, first, p, w_ih, bias);
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t p = p_begin; p < p_end; ++p) for_row_blocks<StepBlock>(f.rows, f, first + k, k, p, w_hh, training);
      if (barrier != nullptr) barrier->wait(++round);
      std::swap(f.h_prev, f.h_next);
    }
  }
}

// One thread's share of run_steps_on_threads: the panels of part `part` of `parts`. Its own function, as
// backward_rows_part: run_parts' OpenMP region and the lambda it calls have no target attribute, so run_steps (always
// inlined, target-specific) cannot go into them.
template <typename Args, typename E, typename W>
__attribute__((target(FASTMSC_PANEL_TARGET), noinline)) void run_steps_part(
    ForwardRows<Args, E>& f, const W* w_ih, const W* w_hh, const float* bias, int64_t part, int64_t parts,
    StepBarrier* barrier) {
  // Parts of whole cache lines of h (a bf16 panel's units fill half of one): no line holds two parts' units.
  constexpr int64_t kLinePanels = std::max<int64_t>(1, 64 / (kWidth * sizeof(E)));
  const int64_t P = f.a.panels, lines = (P + kLinePanels - 1) / kLinePanels;
  run_steps(f, w_ih, w_hh, bias, std::min(P, lines * part / parts * kLinePanels),
            std::min(P, lines * (part + 1) / parts * kLinePanels), barrier);
}

// run_steps over every panel: on f.a.panel_threads threads, each with a share of the panels (the hidden units), where
// that is above 1. A one-row task leaves the other threads idle otherwise, while its step streams all of w_hh from the
// core's L2 (B = 1, H = 128: 256 KB a step); split, each core streams its share. The threads' results are those one
// thread gives: each unit is computed as it would be, by one of them.
template <typename Args, typename E, typename W>
FASTMSC_PANEL_INLINE void run_steps_on_threads(ForwardRows<Args, E>& f, const W* w_ih, const W* w_hh,
                                               const float* bias) {
  const ForwardRows<Args, E> start = f;
  run_parts(f.a.panel_threads, [&](int64_t part, int64_t parts, StepBarrier* barrier) {
    ForwardRows<Args, E> own = start;
    run_steps_part(own, w_ih, w_hh, bias, part, parts, barrier);
  });
  // Each part swapped h_prev and h_next once a step, its own copies: so do f's.
  if (f.a.steps % 2 != 0) std::swap(f.h_prev, f.h_next);
}

// The row stride of the state (ForwardRows::ld) for element type E.
template <typename E>
constexpr int64_t state_ld(int64_t H) {
  constexpr int64_t line = 64 / sizeof(E);
  return (H + line - 1) / line * line;
}

// state (rows, ld) from src (rows, H; null: zeros), a bf16 src widened to float32.
template <typename E, typename S>
FASTMSC_PANEL_INLINE void load_state(const S* src, int64_t rows, int64_t H, int64_t ld, E* state) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < H; ++j) {
      if constexpr (std::is_same_v<E, S>) {
        state[i * ld + j] = src != nullptr ? src[i * H + j] : E(0);
      } else {
        state[i * ld + j] = src != nullptr ? bf16_to_float(src[i * H + j]) : 0.0f;  // a bf16 c0 into float32
      }
    }
  }
}

// Floats of scratch memory forward_rows needs for `rows` rows: the projections, then h_prev, h_next and c_state.
inline int64_t forward_scratch_floats(const PanelForward& a, int64_t rows) {
  return forward_chunk_steps(rows, a.steps) * rows * a.panels * kPanel + 3 * rows * state_ld<float>(a.hidden);
}

// Rows [b_begin, b_end) of direction d, every step. See PanelForward (lstm_cpu.cpp) for the layout of the arguments.
// scratch: forward_scratch_floats(a, b_end - b_begin) floats, any content.
FASTMSC_PANEL_FN void forward_rows(const PanelForward& a, int64_t d, int64_t b_begin, int64_t b_end, float* scratch) {
  const int64_t rows = b_end - b_begin, H = a.hidden, P = a.panels, zw = P * kPanel, ld = state_ld<float>(H);
  const int64_t state = d * a.batch + b_begin;
  float* h_prev = scratch + forward_chunk_steps(rows, a.steps) * rows * zw;
  float* c_state = h_prev + 2 * rows * ld;
  load_state(a.h0 != nullptr ? a.h0 + state * H : nullptr, rows, H, ld, h_prev);
  load_state<float, float>(a.c_n + state * H, rows, H, ld, c_state);  // c_n holds c0 (or zeros) on entry
  ForwardRows<PanelForward, float> f{a, d, b_begin, rows, zw, scratch, h_prev, h_prev + rows * ld, c_state, ld};
  run_steps_on_threads(f, a.w_ih + d * P * panel_elements(a.w_ih, a.input),
                       a.w_hh + d * P * panel_elements(a.w_hh, H), a.bias != nullptr ? a.bias + d * zw : nullptr);
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(f.h_prev + i * ld, f.h_prev + i * ld + H, a.h_n + (state + i) * H);
    std::copy(c_state + i * ld, c_state + i * ld + H, a.c_n + (state + i) * H);
  }
}

#if FASTMSC_PANEL_BF16
inline int64_t forward_scratch_floats_bf16(const PanelForwardBf16& a, int64_t rows) {
  const int64_t ld = state_ld<Bits>(a.hidden);
  return forward_chunk_steps(rows, a.steps) * rows * a.panels * kPanel  // xproj
         + rows * ld                                                    // h_prev, h_next: 2 * rows * ld bf16
         + rows * ld;                                                   // c_state
}

// forward_rows for bfloat16 storage; the cell state stays float32 in scratch and is rounded into c_n at the end.
FASTMSC_PANEL_FN void forward_rows_bf16(const PanelForwardBf16& a, int64_t d, int64_t b_begin, int64_t b_end,
                                        float* scratch) {
  const int64_t rows = b_end - b_begin, H = a.hidden, P = a.panels, zw = P * kPanel, ld = state_ld<Bits>(H);
  const int64_t state = d * a.batch + b_begin;
  Bits* h_prev = reinterpret_cast<Bits*>(scratch + forward_chunk_steps(rows, a.steps) * rows * zw);
  Bits* h_next = h_prev + rows * ld;
  float* c_state = reinterpret_cast<float*>(h_next + rows * ld);  // ld is even: 4-byte aligned
  load_state(a.h0 != nullptr ? a.h0 + state * H : nullptr, rows, H, ld, h_prev);
  load_state(a.c0 != nullptr ? a.c0 + state * H : nullptr, rows, H, ld, c_state);
  ForwardRows<PanelForwardBf16, Bits> f{a, d, b_begin, rows, zw, scratch, h_prev, h_next, c_state, ld};
  run_steps_on_threads(f, a.w_ih + d * P * panel_elements(a.w_ih, a.input),
                       a.w_hh + d * P * panel_elements(a.w_hh, H), a.bias != nullptr ? a.bias + d * zw : nullptr);
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(f.h_prev + i * ld, f.h_prev + i * ld + H, a.h_n + (state + i) * H);
    for (int64_t j0 = 0; j0 < H; j0 += kWidth) {
      store_bf16(a.c_n + (state + i) * H + j0, c_state + i * ld + j0, std::min(kWidth, H - j0));
    }
  }
}
#endif

// cell_backward (lstm_gates.h) of one row's hidden units [u0, u1) of H, kWidth at a time, with dh = dh_carry + dout;
// dc_state holds the gradient reaching c and leaves with the one reaching c_prev. E: the element type of the saved
// state (float, or Bits for the bf16 layers), read as float32. The gate gradients dG go to dgates (E = float), or, for
// bf16 state, rounded to bf16 into dgates_rounded; either way they are summed into dbias_row where it is given (see
// PanelBackwardOf).
template <typename E>
FASTMSC_PANEL_INLINE void gate_gradients(const E* __restrict act, const E* __restrict c, const E* __restrict c_prev,
                                         const float* __restrict dh_carry, const E* __restrict dout,
                                         float* __restrict dc_state, float* __restrict dgates,
                                         uint16_t* __restrict dgates_rounded, float* __restrict dbias_row, int64_t H,
                                         int64_t u0, int64_t u1) {
  const Vec one = vbroadcast(1.0f);
  for (int64_t j0 = u0; j0 < u1; j0 += kWidth) {
    const int64_t n = std::min(kWidth, u1 - j0);
    const Vec i = load_units(act + j0, n), f = load_units(act + H + j0, n), g = load_units(act + 2 * H + j0, n),
              o = load_units(act + 3 * H + j0, n);
    const Vec dh = vadd(load_units(dh_carry + j0, n), load_units(dout + j0, n));
    Vec tanh_c[1] = {load_units(c + j0, n)};
    vtanh(tanh_c);
    const Vec tc = tanh_c[0];
    const Vec dc_total = vfma(vmul(dh, o), vfnma(tc, tc, one), load_units(dc_state + j0, n));
    const Vec dz[4] = {vmul(vmul(dc_total, g), vmul(i, vsub(one, i))),
                       vmul(vmul(dc_total, load_units(c_prev + j0, n)), vmul(f, vsub(one, f))),
                       vmul(vmul(dc_total, i), vfnma(g, g, one)), vmul(vmul(dh, tc), vmul(o, vsub(one, o)))};
    store_units(dc_state + j0, vmul(dc_total, f), n);
    if constexpr (std::is_same_v<E, float>) {
      for (int s = 0; s < 4; ++s) store_units(dgates + s * H + j0, dz[s], n);
    } else {
#if FASTMSC_PANEL_BF16
      for (int s = 0; s < 4; ++s) store_bf16(dgates_rounded + s * H + j0, dz[s], n);
#endif
    }
    if (dbias_row != nullptr) {
      for (int s = 0; s < 4; ++s) {
        store_units(dbias_row + s * H + j0, vadd(load_units(dbias_row + s * H + j0, n), dz[s]), n);
      }
    }
  }
}

// dh_rec rows [i0, i0 + M), columns of panel p: dG_t · w_hh (w_hh packed with its 4H rows as K).
// dG_t's rows: dg + i * dg_rs, i counting the task's rows.
template <int M>
struct RecurrentGradientBlock {
  template <typename Args>
  FASTMSC_PANEL_INLINE static void run(int64_t i0, const Args& a, const float* dg, int64_t dg_rs, int64_t p,
                                       const float* w_hh, float* dh_rec) {
    const int64_t G = 4 * a.hidden, dw = a.panels * kPanel;
    const float* dg_rows[M];
    for (int r = 0; r < M; ++r) dg_rows[r] = dg + (i0 + r) * dg_rs;
    Vec acc[M][4];
    for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = vzero();
    panel_product_columns<M>(a.hidden - p * kPanel, dg_rows, G, w_hh + p * a.w_hh_panel_stride, acc, 1, a.w_hh_ld);
    for (int r = 0; r < M; ++r) {
      for (int s = 0; s < 4; ++s) vstore(dh_rec + (i0 + r) * dw + p * kPanel + s * kWidth, acc[r][s]);
    }
  }
};

#if FASTMSC_PANEL_BF16
// RecurrentGradientBlock for bf16 state: dG_t rounded to bf16 (rows of words, dg + i * dg_rs) times w_hh packed as
// bf16 pairs along its 4H rows (pack_pair_panels), as oneDNN's bf16 backward multiplies them.
template <int M>
struct RecurrentGradientPairBlock {
  template <typename Args>
  FASTMSC_PANEL_INLINE static void run(int64_t i0, const Args& a, const uint32_t* dg, int64_t dg_rs, int64_t p,
                                       const uint32_t* w_hh, float* dh_rec) {
    const int64_t pairs = 2 * a.hidden, dw = a.panels * kPanel, n = a.hidden - p * kPanel;
    const uint32_t* dg_rows[M];
    for (int r = 0; r < M; ++r) dg_rows[r] = dg + (i0 + r) * dg_rs;
    Vec acc[M][4];
    for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = vzero();
    pair_product_columns<M>(n, dg_rows, 1, pairs, w_hh + p * a.w_hh_panel_stride, acc);
    for (int r = 0; r < M; ++r) {
      for (int s = 0; s < 4; ++s) vstore(dh_rec + (i0 + r) * dw + p * kPanel + s * kWidth, acc[r][s]);
    }
  }
};
#endif

// Rows ahead whose saved state backward_rows prefetches.
constexpr int64_t kPrefetchRows = 2;

// Floats of scratch memory backward_rows needs for `rows` rows: dh_rec and a zero row.
template <typename E>
inline int64_t backward_scratch_floats(const PanelBackwardOf<E>& a, int64_t rows) {
  return rows * a.panels * kPanel + a.hidden;
}

// BPTT over rows [b_begin, b_end) of direction d for the hidden units of panels [p_begin, p_end) (their gate
// gradients, and their columns of the recurrent product); see backward_rows. barrier: the threads that run the other
// panels, met after every step's gate gradients, which the product reads whole; null when this thread runs them all.
template <typename E>
__attribute__((target(FASTMSC_PANEL_TARGET), noinline)) void backward_rows_part(
    const PanelBackwardOf<E>& a, int64_t d, int64_t b_begin, int64_t b_end, float* scratch, int64_t p_begin,
    int64_t p_end, StepBarrier* barrier) {
  const int64_t rows = b_end - b_begin, H = a.hidden, T_ = a.steps, P = a.panels, G = 4 * H;
  const int64_t dw = P * kPanel;                                          // a row of dh_rec: H padded to whole panels
  const int64_t u0 = p_begin * kPanel, u1 = std::min(H, p_end * kPanel);  // this part's hidden units
  float* dh_rec = scratch;  // read only where written in the step before
  const E* zeros = reinterpret_cast<const E*>(dh_rec + rows * dw);  // H floats of zero bits: +0 as float and as bf16
  constexpr bool kRounded = !std::is_same_v<E, float>;              // bf16 state: dG rounded, see gate_gradients
  const float* w_hh = a.w_hh + d * a.w_hh_direction_stride;
  float* dh_state = a.dh_state + (d * a.batch + b_begin) * H;
  float* dc_state = a.dc_state + (d * a.batch + b_begin) * H;
  int64_t round = 0;

  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = d == 0 ? step : T_ - 1 - step;
    const int64_t t_next = d == 0 ? t + 1 : t - 1, t_prev = d == 0 ? t - 1 : t + 1;
    for (int64_t i = 0; i < rows; ++i) {
      if (i + kPrefetchRows < rows) {
        // The saved state of a later row of this step: rows lie a whole sequence apart in memory (batch first), too
        // far for the hardware prefetchers, and this loop otherwise waits on their cache misses.
        const int64_t b_ahead = b_begin + i + kPrefetchRows;
        prefetch_lines(a.gates + b_ahead * a.gates_sb + t * a.gates_st + d * G, G * sizeof(E));
        prefetch_lines(a.cells + b_ahead * a.cells_sb + t * a.cells_st + d * H, H * sizeof(E));
        if (t_prev >= 0 && t_prev < T_) {
          prefetch_lines(a.cells + b_ahead * a.cells_sb + t_prev * a.cells_st + d * H, H * sizeof(E));
        }
        if (a.dout != nullptr) prefetch_lines(a.dout + b_ahead * a.dout_sb + t * a.dout_st + d * H, H * sizeof(E));
      }
      const int64_t b = b_begin + i, len = a.lens != nullptr ? a.lens[b] : T_;
      // dh reaching h_t: the recurrent product of the step handled before where that step was valid, else the carried
      // value (the h_n gradient before a sequence's last step, or a finished sequence's h0 gradient); a padded step
      // after which the sequence still runs (the reverse direction's padding) carries the product's value on.
      const bool next_valid = step < T_ - 1 && t_next >= 0 && t_next < len;
      const float* dh_carry = next_valid ? dh_rec + i * dw : dh_state + i * H;
      const int64_t dg_at = b * a.dgates_sb + t * a.dgates_st + d * G;
      if (t >= len) {
        if (next_valid) std::copy(dh_carry + u0, dh_carry + u1, dh_state + i * H + u0);
        for (int64_t g = 0; g < 4; ++g) {
          if constexpr (kRounded) {
            std::fill(a.dgates_rounded + dg_at + g * H + u0, a.dgates_rounded + dg_at + g * H + u1, uint16_t(0));
          } else {
            std::fill(a.dgates + dg_at + g * H + u0, a.dgates + dg_at + g * H + u1, 0.0f);
          }
        }
        continue;
      }
      const bool first = d == 0 ? t == 0 : t == len - 1;
      const E* c_prev = first ? (a.c0 != nullptr ? a.c0 + (d * a.batch + b) * H : zeros)
                              : a.cells + b * a.cells_sb + t_prev * a.cells_st + d * H;
      const E* dout = a.dout != nullptr ? a.dout + b * a.dout_sb + t * a.dout_st + d * H : zeros;
#if !FASTMSC_PANEL_BF16
      static_assert(!kRounded, "bf16 state runs in the AVX512_BF16 variant only");
#endif
      gate_gradients(a.gates + b * a.gates_sb + t * a.gates_st + d * G,
                     a.cells + b * a.cells_sb + t * a.cells_st + d * H, c_prev, dh_carry, dout, dc_state + i * H,
                     kRounded ? nullptr : a.dgates + dg_at, kRounded ? a.dgates_rounded + dg_at : nullptr,
                     a.dbias_rows != nullptr ? a.dbias_rows + (d * a.batch + b) * G : nullptr, H, u0, u1);
    }
    // dh reaching h_{t_prev} = dG_t · w_hh; the very last one is the h0 gradient, needed only when asked for.
    if (step == 0 && !a.need_dstate) break;
    if (barrier != nullptr) barrier->wait(++round);  // the product reads every part's gate gradients
    const int64_t dg_at = b_begin * a.dgates_sb + t * a.dgates_st + d * G;
#if FASTMSC_PANEL_BF16
    if constexpr (kRounded) {  // the rounded dG_t (its rows' pairs as words) times w_hh's pairs
      const auto* dg_words = reinterpret_cast<const uint32_t*>(a.dgates_rounded + dg_at);
      const auto* w_pairs = reinterpret_cast<const uint32_t*>(w_hh);
      for (int64_t p = p_begin; p < p_end; ++p) {
        for_row_blocks<RecurrentGradientPairBlock>(rows, a, dg_words, a.dgates_sb / 2, p, w_pairs, dh_rec);
      }
      continue;
    }
#endif
    for (int64_t p = p_begin; p < p_end; ++p) {
      for_row_blocks<RecurrentGradientBlock>(rows, a, a.dgates + dg_at, a.dgates_sb, p, w_hh, dh_rec);
    }
  }
  if (a.need_dstate) {
    // The h0 gradient: the last product where the forward's first step was valid for the row, else the value
    // carried when the sequence finished.
    const int64_t t_first = d == 0 ? 0 : T_ - 1;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t len = a.lens != nullptr ? a.lens[b_begin + i] : T_;
      if (t_first < len) std::copy(dh_rec + i * dw + u0, dh_rec + i * dw + u1, dh_state + i * H + u0);
    }
  }
}

// BPTT over rows [b_begin, b_end) of direction d. See PanelBackwardOf (lstm_cpu.cpp): the saved state in E (float, or
// Bits for bf16 layers), read as float32; the gradients float32 throughout. On a.panel_threads threads where that is
// above 1, each with a share of the panels (as run_steps_on_threads shares the forward's), meeting once a step.
// scratch: backward_scratch_floats(a, b_end - b_begin) floats, any content.
template <typename E>
FASTMSC_PANEL_FN void backward_rows(const PanelBackwardOf<E>& a, int64_t d, int64_t b_begin, int64_t b_end,
                                    float* scratch) {
  float* zero_floats = scratch + (b_end - b_begin) * a.panels * kPanel;
  std::fill(zero_floats, zero_floats + a.hidden, 0.0f);
  run_parts(std::min(a.panel_threads, a.panels), [&](int64_t part, int64_t parts, StepBarrier* barrier) {
    backward_rows_part(a, d, b_begin, b_end, scratch, a.panels * part / parts, a.panels * (part + 1) / parts,
                       barrier);
  });
}

// A row block's rows of A from depth k0 and of C from column n0, its first row `first` (PanelGemm or PairGemm).
template <int M, typename Gemm, typename A>
FASTMSC_PANEL_INLINE void block_rows(const Gemm& g, int64_t first, int64_t k0, int64_t n0, const A* (&a_rows)[M],
                                     float* (&c_rows)[M]) {
  for (int r = 0; r < M; ++r) {
    a_rows[r] = g.a + (first + r) * g.a_rs + k0 * g.a_ks;
    c_rows[r] = g.c + (first + r) * g.ldc + n0;
  }
}

// The accumulators of C's rows c_rows[r] over a panel's first n columns: zero, or C's values with accumulate; lanes
// past n read as zero.
template <int M>
FASTMSC_PANEL_INLINE void load_c_rows(float* const (&c_rows)[M], int64_t n, bool accumulate, Vec (&acc)[M][4]) {
  for (int r = 0; r < M; ++r) {
    for (int s = 0; s < 4; ++s) {
      const int64_t cols = n - s * kWidth;  // of this vector
      acc[r][s] = !accumulate || cols <= 0 ? vzero()
                  : cols >= kWidth         ? vload(c_rows[r] + s * kWidth)
                                           : vload_first(c_rows[r] + s * kWidth, cols);
    }
  }
}

// The accumulators back into C's rows, the first n columns only.
template <int M>
FASTMSC_PANEL_INLINE void store_c_rows(const Vec (&acc)[M][4], float* const (&c_rows)[M], int64_t n) {
  for (int r = 0; r < M; ++r) {
    for (int s = 0; s < 4; ++s) {
      const int64_t cols = n - s * kWidth;
      if (cols >= kWidth) {
        vstore(c_rows[r] + s * kWidth, acc[r][s]);
      } else if (cols > 0) {
        vstore_first(c_rows[r] + s * kWidth, acc[r][s], cols);
      }
    }
  }
}

// C rows [i0, i0 + M) (+)= A · B over k in [k0, k0 + kn), columns of panel p (see PanelGemm, lstm_cpu.cpp). The last
// panel's columns past N are masked off: nothing outside C is read or written.
template <int M>
struct GemmBlock {
  FASTMSC_PANEL_INLINE static void run(int64_t i0, const PanelGemm& g, int64_t r_begin, int64_t k0, int64_t kn,
                                       int64_t p, bool accumulate) {
    const int64_t n0 = p * kPanel, n = std::min(kPanel, g.n - n0);
    const float* a_rows[M];
    float* c_rows[M];
    block_rows<M>(g, r_begin + i0, k0, n0, a_rows, c_rows);
    Vec acc[M][4];
    load_c_rows<M>(c_rows, n, accumulate, acc);
    if (g.ldb != 0) {
      panel_product_columns<M>(n, a_rows, kn, g.b + k0 * g.ldb + p * kPanel, acc, g.a_ks, g.ldb);
    } else {
      panel_product_columns<M>(n, a_rows, kn, g.b + (p * g.k + k0) * kPanel, acc, g.a_ks, kPanel);
    }
    store_c_rows<M>(acc, c_rows, n);
  }
};

// Rows [r_begin, r_end) of C = A · B (or C += A · B), Block<M> a row block's product (GemmBlock, PairGemmBlock). k is
// blocked so that a panel's block (kGemmDepth x kPanel words, 64 KB at AVX-512) stays in L1/L2 while the row blocks
// pass over it. Where C is large (dx: B*T rows) the rows are taken kGemmRows at a time as well, so that their part of
// C stays in cache across the k blocks instead of going to memory and back once per k block; where C is small (the
// weight gradients) it stays in L2 anyway and the rows go in one sweep, so that B (x or h_prev: B*T rows) is read
// once.
template <template <int> class Block, typename Gemm>
FASTMSC_PANEL_INLINE void blocked_gemm_rows(const Gemm& g, int64_t r_begin, int64_t r_end) {
  constexpr int64_t kGemmDepth = 256, kGemmRows = 16 * kRows;
  const int64_t P = (g.n + kPanel - 1) / kPanel;
  const bool c_fits = (r_end - r_begin) * g.n <= (int64_t{256} << 10);  // 1 MB of C
  const int64_t row_step = c_fits ? r_end - r_begin : kGemmRows;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += row_step) {
    const int64_t rows = std::min(row_step, r_end - r0);
    for (int64_t k0 = 0; k0 < g.k; k0 += kGemmDepth) {
      const int64_t kn = std::min(kGemmDepth, g.k - k0);
      for (int64_t p = 0; p < P; ++p) {
        for_row_blocks<Block>(rows, g, r0, k0, kn, p, g.accumulate || k0 > 0);
      }
    }
  }
}

FASTMSC_PANEL_FN void gemm_rows(const PanelGemm& g, int64_t r_begin, int64_t r_end) {
  blocked_gemm_rows<GemmBlock>(g, r_begin, r_end);
}

#if FASTMSC_PANEL_BF16
// ---------------------------------------------------------------------------------------------------
// The bf16 backward's products after the BPTT loop (dx, dW_ih, dW_hh; see PairGemm, lstm_cpu.cpp): both factors bf16,
// held as pairs along k in 32-bit words (the low half first), multiplied by vdpbf16ps with float32 sums.

template <int M>
struct PairGemmBlock {
  FASTMSC_PANEL_INLINE static void run(int64_t i0, const PairGemm& g, int64_t r_begin, int64_t k0, int64_t kn,
                                       int64_t p, bool accumulate) {
    const int64_t n0 = p * kPanel, n = std::min(kPanel, g.n - n0);
    const uint32_t* a_rows[M];
    float* c_rows[M];
    block_rows<M>(g, r_begin + i0, k0, n0, a_rows, c_rows);
    Vec acc[M][4];
    load_c_rows<M>(c_rows, n, accumulate, acc);
    pair_product_columns<M>(n, a_rows, g.a_ks, kn, g.b + (p * g.k + k0) * kPanel, acc);
    store_c_rows<M>(acc, c_rows, n);
  }
};

FASTMSC_PANEL_FN void pair_gemm_rows(const PairGemm& g, int64_t r_begin, int64_t r_end) {
  blocked_gemm_rows<PairGemmBlock>(g, r_begin, r_end);
}

// GCC 12's false "uninitialized __Y" in its AVX-512 intrinsics again (see transpose_tile).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// One pair row of pair panels (see pack_pair_panels, lstm_cpu.cpp) of a matrix whose rows are an x row (I elements)
// followed by an h row (H elements, none for H = 0): word c of panel p (at dst + p * panel_stride) pairs column
// p * kPanel + c of the two rows. h's part starts at column I' = I rounded up to kWidth (columns I..I'-1 are zero), so
// that each part fills whole vectors. x0, x1 are the two rows' x parts and h0, h1 their h parts (null reads as zeros);
// zero past I' + H to the end of the last panel.
FASTMSC_PANEL_FN void pack_pair_row(const Bits* x0, const Bits* x1, int64_t I, const Bits* h0, const Bits* h1,
                                    int64_t H, uint32_t* dst, int64_t panel_stride) {
  const int64_t x_vectors = (I + kWidth - 1) / kWidth, h_vectors = (H + kWidth - 1) / kWidth;
  const int64_t vectors = (x_vectors + h_vectors + 3) / 4 * 4;
  for (int64_t v = 0; v < vectors; ++v) {
    const bool in_x = v < x_vectors;
    const Bits* r0 = in_x ? x0 : h0;
    const Bits* r1 = in_x ? x1 : h1;
    const int64_t col = (in_x ? v : v - x_vectors) * kWidth;
    const int64_t m = v < x_vectors + h_vectors ? std::min(kWidth, (in_x ? I : H) - col) : 0;
    const __m512i lo = r0 != nullptr && m > 0 ? _mm512_cvtepu16_epi32(load_bits(r0 + col, m)) : _mm512_setzero_si512();
    const __m512i hi = r1 != nullptr && m > 0 ? _mm512_cvtepu16_epi32(load_bits(r1 + col, m)) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + v / 4 * panel_stride + v % 4 * kWidth, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// Rows r0 and r1 (n bf16 each; r1 null: zeros) interleaved into n words (r0[c], r1[c]): a pair row of the gate
// gradients for the weight gradients' products.
FASTMSC_PANEL_FN void interleave_rows(const Bits* r0, const Bits* r1, int64_t n, uint32_t* dst) {
  for (int64_t c = 0; c < n; c += kWidth) {
    const int64_t m = std::min(kWidth, n - c);
    const __m512i lo = _mm512_cvtepu16_epi32(load_bits(r0 + c, m));
    const __m512i hi = r1 != nullptr ? _mm512_cvtepu16_epi32(load_bits(r1 + c, m)) : _mm512_setzero_si512();
    const __m512i words = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
    if (m == kWidth) {
      _mm512_storeu_si512(dst + c, words);
    } else {
      _mm512_mask_storeu_epi32(dst + c, static_cast<__mmask16>((1u << m) - 1), words);
    }
  }
}
#pragma GCC diagnostic pop
#endif

#undef FASTMSC_PANEL_INLINE
#undef FASTMSC_PANEL_FN
