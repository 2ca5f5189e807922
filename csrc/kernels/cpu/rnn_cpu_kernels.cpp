// Where a time step happens on the CPU: here, in forward() and backward() (path "tiles", the
// default up to knob cpu_tiles_max_hidden). Path "gemm" runs its steps in ops/rnn_layer.h instead,
// one BLAS GEMM per step, the loop the CUDA ops share.
//
// CPU recurrence kernels for one instruction set. CMake compiles this file once per ISA with
// MYRNN_ISA (a name) and MYRNN_VECTOR_BYTES (16, 32 or 64) set, and the matching -m flags; the
// code is written once with GCC/Clang vector extensions, so the compiler picks the instructions.
//
// Where the time goes at small hidden sizes is the recurrence h_t = act(p_t + h_{t-1} W_hh^T):
// a tiny matrix product per step that no BLAS call can make cheap. Here a tile of R rows by NV
// vectors of columns keeps its accumulators in registers across the whole k loop, and the
// nonlinearity is applied to those registers before the single store.

#include "kernels/cpu/rnn_cpu_kernels.h"

#include <algorithm>
#include <cmath>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef MYRNN_ISA
#error "MYRNN_ISA must name the instruction set this file is compiled for"
#endif
#ifndef MYRNN_VECTOR_BYTES
#error "MYRNN_VECTOR_BYTES must give the vector width in bytes"
#endif

#define MYRNN_CAT2(a, b) a##b
#define MYRNN_CAT(a, b) MYRNN_CAT2(a, b)

namespace myrnn_fast::cpu {
namespace MYRNN_ISA {
namespace {

constexpr int kBytes = MYRNN_VECTOR_BYTES;
typedef float vfloat __attribute__((vector_size(kBytes)));
typedef double vdouble __attribute__((vector_size(kBytes)));
typedef int32_t vint32 __attribute__((vector_size(kBytes)));

typedef uint32_t vuint32 __attribute__((vector_size(kBytes)));
// A float vector's worth of 16-bit values.
typedef uint16_t vbits16 __attribute__((vector_size(kBytes / 2)));
typedef _Float16 vhalf __attribute__((vector_size(kBytes / 2)));

// The type a storage type S is computed in: float for the 16-bit types, else S itself.
template <typename S> struct Compute { using type = S; };
template <> struct Compute<bf16> { using type = float; };
template <> struct Compute<f16> { using type = float; };
template <typename S> using compute_t = typename Compute<S>::type;

template <typename T> struct Vec;
template <> struct Vec<float> { using type = vfloat; };
template <> struct Vec<double> { using type = vdouble; };
template <> struct Vec<bf16> { using type = vfloat; };
template <> struct Vec<f16> { using type = vfloat; };
// The register vector a buffer of S is computed in, and its number of lanes.
template <typename S> using vec = typename Vec<S>::type;
template <typename S> constexpr int kLanes = kBytes / sizeof(compute_t<S>);

// What the 16-bit loads and stores above compile to here (for `myrnn-fast info`).
// With AVX512-BF16 the bfloat16 recurrence multiplies two k at a time: vdpbf16ps adds
// a[k] m[k][j] + a[k+1] m[k+1][j] for 16 columns in one instruction, half the multiply-add
// instructions of float32 and no widening. It takes the recurrent matrix with rows k and k+1
// interleaved (Matrix::kBf16Pairs).
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BF16__)
constexpr bool kPairs = true;
constexpr const char* kConversions =
    "bfloat16: AVX512-BF16 (vdpbf16ps, vcvtneps2bf16); float16: F16C (vcvtph2ps, vcvtps2ph)";
#elif defined(__F16C__) || defined(__AVX512F__)
constexpr bool kPairs = false;
constexpr const char* kConversions = "bfloat16: shift and integer rounding; float16: F16C (vcvtph2ps, vcvtps2ph)";
#else
constexpr bool kPairs = false;
constexpr const char* kConversions = "bfloat16: shift and integer rounding; float16: software";
#endif

constexpr int kRows = 4;     // rows per register tile
constexpr int kVectors = 2;  // vectors of columns per register tile

template <typename To, typename From> inline To bits_as(From v) { return __builtin_bit_cast(To, v); }

// ---- storage <-> registers: 16-bit values widen on load and round to nearest even on store --

// kLanes<S> values of S from p into a vector of compute_t<S>.
template <typename S> inline vec<S> load(const S* p) {
  vec<S> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// bfloat16 is float's upper half: widening is a shift.
template <> inline vfloat load(const bf16* p) {
  vbits16 h;
  std::memcpy(&h, p, sizeof h);
  return bits_as<vfloat>(__builtin_convertvector(h, vuint32) << 16);
}
// float16 by F16C's vcvtph2ps where there is one (GCC 12 converts _Float16 vectors one lane at a
// time, so the intrinsics name the vector instruction), else lane by lane.
template <> inline vfloat load(const f16* p) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512F__)
  return bits_as<vfloat>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif MYRNN_VECTOR_BYTES == 32 && defined(__F16C__)
  return bits_as<vfloat>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vfloat);
#endif
}

template <typename S> inline void store(S* p, vec<S> v) { std::memcpy(p, &v, sizeof v); }
template <> inline void store(bf16* p, vfloat v) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BF16__)
  // vcvtneps2bf16 rounds to nearest even and keeps NaN a NaN.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits_as<__m256i>(_mm512_cvtneps_pbh(bits_as<__m512>(v))));
  return;
#endif
  const vuint32 b = bits_as<vuint32>(v);
  const vuint32 rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  // NaN must stay NaN: rounding could carry its payload into the exponent (or to Inf).
  const vuint32 nan = bits_as<vuint32>(v != v);
  const vuint32 r = (nan & ((b >> 16) | 0x40u)) | (~nan & rounded);
  const vbits16 h = __builtin_convertvector(r, vbits16);
  std::memcpy(p, &h, sizeof h);
}
template <> inline void store(f16* p, vfloat v) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(bits_as<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif MYRNN_VECTOR_BYTES == 32 && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(bits_as<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  const vhalf h = __builtin_convertvector(v, vhalf);
  std::memcpy(p, &h, sizeof h);
#endif
}

// The scalar conversions, for the columns past the last full vector.
template <typename S> inline compute_t<S> widen(S v) { return v; }
inline float widen(bf16 v) { return __builtin_bit_cast(float, uint32_t{v.bits} << 16); }
inline float widen(f16 v) { return static_cast<float>(__builtin_bit_cast(_Float16, v.bits)); }

template <typename S> inline S narrow(compute_t<S> v) { return v; }
template <> inline bf16 narrow(float v) {
  const uint32_t b = __builtin_bit_cast(uint32_t, v);
  if (v != v) return {static_cast<uint16_t>((b >> 16) | 0x40u)};
  return {static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16)};
}
template <> inline f16 narrow(float v) { return {__builtin_bit_cast(uint16_t, static_cast<_Float16>(v))}; }

// tanh for float vectors, accurate to a few ulp: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|),
// and the odd Taylor series below |x| = 1/4, where 1 - e would cancel. NaN stays NaN (no
// comparison lets it through), +-Inf gives +-1.
inline vfloat tanh_vec(vfloat x) {
  const vint32 bits = bits_as<vint32>(x);
  const vfloat ax = bits_as<vfloat>(bits & INT32_MAX);
  vfloat a = -2.0f * ax;
  a = a < -87.0f ? vfloat{} - 87.0f : a;  // e underflows below; tanh is +-1 there anyway
  // exp(a) = 2^n exp(r), |r| <= ln2/2; adding and subtracting 1.5 * 2^23 rounds to an integer.
  const vfloat n = (a * 1.44269504f + 12582912.0f) - 12582912.0f;
  const vfloat r = (a - n * 0.693145752f) - n * 1.42860677e-6f;
  vfloat p = 1.0f / 5040.0f + r * (1.0f / 40320.0f);
  p = 1.0f / 720.0f + r * p;
  p = 1.0f / 120.0f + r * p;
  p = 1.0f / 24.0f + r * p;
  p = 1.0f / 6.0f + r * p;
  p = 0.5f + r * p;
  p = 1.0f + r * p;
  p = 1.0f + r * p;
  const vint32 scale = (__builtin_convertvector(n, vint32) + 127) << 23;
  const vfloat e = p * bits_as<vfloat>(scale);
  const vfloat big = (1.0f - e) / (1.0f + e);
  const vfloat big_signed = bits_as<vfloat>(bits_as<vint32>(big) | (bits & INT32_MIN));
  const vfloat x2 = x * x;
  vfloat s = vfloat{} - 1382.0f / 155925.0f;
  s = 62.0f / 2835.0f + x2 * s;
  s = -17.0f / 315.0f + x2 * s;
  s = 2.0f / 15.0f + x2 * s;
  s = -1.0f / 3.0f + x2 * s;
  const vfloat small = x + x * x2 * s;
  return ax < 0.25f ? small : big_signed;
}

// No double-precision vector tanh: float64 is for checking, not for speed, so it takes libm's.
inline vdouble tanh_vec(vdouble x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::tanh(x[i]);
  return x;
}

// NaN must survive ReLU as it does in torch: `z < 0` is false for NaN, so NaN passes.
template <typename V> inline V relu_vec(V z) { return z < 0 ? V{} : z; }

template <typename V> inline V act_vec(V z, bool relu) { return relu ? relu_vec(z) : tanh_vec(z); }

// act'(z) written in terms of y = act(z): 1 - y^2 for tanh; for ReLU 0 where y <= 0 and 1
// elsewhere, NaN included, as torch's threshold_backward.
template <typename V> inline V dact_vec(V y, bool relu) {
  if (relu) return y <= 0 ? V{} : V{} + 1;
  return 1 - y * y;
}

template <typename T> inline T act_scalar(T z, bool relu) {
  if (relu) return z < 0 ? T(0) : z;
  return std::tanh(z);
}
template <typename T> inline T dact_scalar(T y, bool relu) {
  if (relu) return y <= 0 ? T(0) : T(1);
  return 1 - y * y;
}

enum class Epilogue { kActivate, kMulDact };

// What one step computes for a block of rows: dst = epilogue(init + prev M). Row pointers are
// at the block's first row, with row stride H. T is the storage type of init, dst and y; A that
// of prev and M that of m (see Layout below): T itself, except where float16/bfloat16 kernels
// keep a float copy of the state and of m (kFloatScratch).
//
// The input projection x W_ih^T + b is not folded in here, although that would save a pass at
// tiny input sizes: it is the same BLAS GEMM torch.nn runs, so overflowing products turn into
// the same Inf and NaN as in torch.nn (an FMA chain would not round a product to Inf first).
template <typename T, typename A = T, typename M = T>
struct Operands {
  const T* init = nullptr;  // per-row start values, or null
  const A* prev = nullptr;  // the rows' previous state (forward) or next dz (backward)
  const M* m = nullptr;     // [H][H], in the layout of m_index
  T* dst = nullptr;
  float* dst_float = nullptr;  // with a float scratch: dst's values again, widened, for the next step
  const T* y = nullptr;        // the saved output, for the backward epilogue
  int64_t H = 0;
  bool relu = false;

  Operands at_row(int64_t r) const {
    Operands o = *this;
    auto shift = [r](auto* p, int64_t stride) { return p ? p + r * stride : p; };
    o.init = shift(init, H);
    o.prev = shift(prev, H);
    o.dst = shift(dst, H);
    o.dst_float = shift(dst_float, H);
    o.y = shift(y, H);
    return o;
  }
};

// Without pairwise bfloat16 instructions, 16-bit kernels would widen every state value and
// every weight they multiply, once per multiply-add row: more instructions than the products
// themselves at small sizes. Instead they take m in float32 (from the per-call copy that
// transposes W_hh anyway) and keep each row's state in a float scratch beside the 16-bit output:
// the value rounded to the storage type, widened back, so the results are those of the 16-bit
// state, at float32's instruction count.
template <typename T>
constexpr bool kFloatScratch = (std::is_same_v<T, bf16> && !kPairs) || std::is_same_v<T, f16>;

// The type the kernels take the recurrent matrix m in.
template <typename T> using matrix_t = std::conditional_t<kFloatScratch<T>, float, T>;

// Where m[k][j] is in the recurrent matrix's layout (see kPairs).
template <typename M> constexpr int64_t m_index(int64_t k, int64_t j, int64_t H) {
  if constexpr (std::is_same_v<M, bf16> && kPairs) return (k / 2) * 2 * H + 2 * j + (k & 1);
  return k * H + j;
}

// acc[k % S][r][v] += a[r, k] * m[k, j + v W] over k < H: S independent sets of accumulators,
// so that one row alone still has enough FMA chains in flight to hide their latency.
template <typename T, int R, int NV, int S, typename A, typename M>
inline void accumulate(vec<T> (&acc)[S][R][NV], const A* a, const M* m, int64_t H, int64_t j) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  int64_t k = 0;
  auto one = [&](int set, int64_t kk) {
    V col[NV];
    for (int v = 0; v < NV; ++v) col[v] = load(m + kk * H + j + v * W);
    for (int r = 0; r < R; ++r) {
      const V p = V{} + widen(a[r * H + kk]);
      for (int v = 0; v < NV; ++v) acc[set][r][v] += p * col[v];
    }
  };
  if constexpr (std::is_same_v<M, bf16> && kPairs) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BF16__)
    // m is [ceil(H/2)][H][2]: rows k and k+1 interleaved, a zero row after an odd H's last.
    auto pairs = [&](int set, int64_t kk, const uint32_t* pair) {
      __m512bh col[NV];
      for (int v = 0; v < NV; ++v)
        col[v] = bits_as<__m512bh>(_mm512_loadu_si512(m + kk * H + 2 * (j + v * W)));
      for (int r = 0; r < R; ++r) {
        const __m512bh both = bits_as<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair[r])));
        for (int v = 0; v < NV; ++v)
          acc[set][r][v] = bits_as<V>(_mm512_dpbf16_ps(bits_as<__m512>(acc[set][r][v]), both, col[v]));
      }
    };
    uint32_t pair[R];
    int set = 0;
    for (; k + 2 <= H; k += 2, set = (set + 1) % S) {
      for (int r = 0; r < R; ++r) std::memcpy(&pair[r], a + r * H + k, sizeof(uint32_t));
      pairs(set, k, pair);
    }
    if (k < H) {  // an odd H's last k, paired with zero (a[r, H] is the next row, or past the end)
      for (int r = 0; r < R; ++r) pair[r] = a[r * H + k].bits;
      pairs(0, k, pair);
    }
    return;
#endif
  } else {
    for (; k + S <= H; k += S)
      for (int set = 0; set < S; ++set) one(set, k + set);
  }
  for (; k < H; ++k) one(0, k);
}

// R rows by NV vectors of columns from column j, accumulators in registers, then the epilogue.
template <typename T, int R, int NV, int S, Epilogue E, typename A, typename M>
inline void tile(const Operands<T, A, M>& o, int64_t j) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  const int64_t H = o.H;
  V acc[S][R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      acc[0][r][v] = o.init ? load(o.init + r * H + j + v * W) : V{};
      for (int set = 1; set < S; ++set) acc[set][r][v] = V{};
    }
  accumulate<T, R, NV, S>(acc, o.prev, o.m, H, j);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      V sum = acc[0][r][v];
      for (int set = 1; set < S; ++set) sum += acc[set][r][v];
      V out;
      if constexpr (E == Epilogue::kActivate) {
        out = act_vec(sum, o.relu);
      } else {
        out = sum * dact_vec(load(o.y + r * H + j + v * W), o.relu);
      }
      const int64_t at = r * H + j + v * W;
      store(o.dst + at, out);
      if constexpr (kFloatScratch<T>) store(o.dst_float + at, load(o.dst + at));
    }
}

// R rows over all H columns: wide register tiles, then narrower, then scalar columns. A single
// row gets wider tiles and two accumulator sets: it has no other rows to fill the FMA pipes.
template <typename T, int R, Epilogue E, typename A, typename M>
inline void rows(const Operands<T, A, M>& o) {
  constexpr int W = kLanes<T>;
  constexpr int S = R == 1 ? 2 : 1;
  const int64_t H = o.H;
  int64_t j = 0;
  if constexpr (R == 1)
    for (; j + 4 * W <= H; j += 4 * W) tile<T, R, 4, S, E>(o, j);
  for (; j + kVectors * W <= H; j += kVectors * W) tile<T, R, kVectors, S, E>(o, j);
  for (; j + W <= H; j += W) tile<T, R, 1, S, E>(o, j);
  for (; j < H; ++j) {
    for (int r = 0; r < R; ++r) {
      using C = compute_t<T>;
      C acc = o.init ? widen(o.init[r * H + j]) : C(0);
      for (int64_t k = 0; k < H; ++k) acc += widen(o.prev[r * H + k]) * widen(o.m[m_index<M>(k, j, H)]);
      o.dst[r * H + j] = narrow<T>(E == Epilogue::kActivate ? act_scalar(acc, o.relu)
                                                            : acc * dact_scalar(widen(o.y[r * H + j]), o.relu));
      if constexpr (kFloatScratch<T>) o.dst_float[r * H + j] = widen(o.dst[r * H + j]);
    }
  }
}

// Rows [r0, r1) of one step, in tiles of kRows rows and then one row at a time.
template <typename T, Epilogue E, typename A, typename M>
inline void step_rows(const Operands<T, A, M>& o, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows<T, kRows, E>(o.at_row(r));
  for (; r < r1; ++r) rows<T, 1, E>(o.at_row(r));
}

// With kFloatScratch<T>, the float state of rows [0, r1): the previous step's and the current
// one's, swapped after every step (indexed by absolute row, so rows [r0, r1) of both are used).
template <typename T>
struct StateScratch {
  using A = std::conditional_t<kFloatScratch<T>, float, T>;
  std::vector<float> buffer;
  float* prev = nullptr;
  float* cur = nullptr;
  StateScratch(int64_t rows, int64_t H) {
    if constexpr (kFloatScratch<T>) {
      buffer.resize(2 * rows * H);
      prev = buffer.data();
      cur = prev + rows * H;
    }
  }
  void swap() { std::swap(prev, cur); }
};

template <typename T>
void forward(const Sequence& s, T* out, const T* h0, const void* w_hh_t, T* h_n, bool relu, int64_t r0, int64_t r1) {
  using M = matrix_t<T>;
  const int64_t H = s.hidden;
  StateScratch<T> scratch(r1, H);
  Operands<T, typename StateScratch<T>::A, M> o;
  o.m = static_cast<const M*>(w_hh_t);
  o.H = H;
  o.relu = relu;
  if constexpr (kFloatScratch<T>) {
    for (int64_t i = r0 * H; i < r1 * H; ++i) scratch.prev[i] = widen(h0[i]);
    o.prev = scratch.prev;
  } else {
    o.prev = h0;
  }
  for (int64_t t = 0; t < s.seq_len; ++t) {
    const Step step = step_at(s, t);
    const int64_t active = std::min(r1, step.batch_size);
    if (active <= r0) break;  // batch sizes never grow again
    T* cur = out + step.offset * H;
    o.dst = cur;
    o.init = cur;
    o.dst_float = scratch.cur;
    step_rows<T, Epilogue::kActivate>(o, r0, active);
    // Rows whose sequence ends here: their state is final.
    const int64_t first_done = std::max(r0, std::min(active, step.next_batch_size));
    if (active > first_done)
      std::memcpy(h_n + first_done * H, cur + first_done * H, (active - first_done) * H * sizeof(T));
    if constexpr (kFloatScratch<T>) {
      scratch.swap();
      o.prev = scratch.prev;
    } else {
      o.prev = cur;
    }
  }
}

template <typename T>
void backward(const Sequence& s, T* dz, const T* grad_out, const T* grad_h_n, const T* out, const void* w_hh,
              bool relu, int64_t r0, int64_t r1) {
  using V = vec<T>;
  using M = matrix_t<T>;
  constexpr int W = kLanes<T>;
  const int64_t H = s.hidden;
  StateScratch<T> scratch(r1, H);
  for (int64_t t = s.seq_len - 1; t >= 0; --t) {
    const Step step = step_at(s, t);
    const int64_t active = std::min(r1, step.batch_size);
    if (active <= r0) continue;  // this chunk's rows start later in the (reversed) sequence
    const int64_t base = step.offset * H;
    const T* g = grad_out ? grad_out + base : nullptr;
    // Rows still running at t+1 receive dz_{t+1} W_hh ...
    const int64_t carried = std::max(r0, std::min(active, step.next_batch_size));
    if (carried > r0) {
      Operands<T, typename StateScratch<T>::A, M> o;
      o.init = g;
      if constexpr (kFloatScratch<T>)
        o.prev = scratch.prev;
      else
        o.prev = dz + step_at(s, t + 1).offset * H;  // carried rows exist, so step t + 1 does
      o.m = static_cast<const M*>(w_hh);
      o.dst = dz + base;
      o.dst_float = scratch.cur;
      o.y = out + base;
      o.H = H;
      o.relu = relu;
      step_rows<T, Epilogue::kMulDact>(o, r0, carried);
    }
    // ... rows ending at t receive grad_h_n instead.
    for (int64_t r = carried; r < active; ++r) {
      const int64_t row = base + r * H;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        V acc = g ? load(g + r * H + j) : V{};
        if (grad_h_n) acc += load(grad_h_n + r * H + j);
        store(dz + row + j, acc * dact_vec(load(out + row + j), relu));
        if constexpr (kFloatScratch<T>) store(scratch.cur + r * H + j, load(dz + row + j));
      }
      for (; j < H; ++j) {
        using C = compute_t<T>;
        const C acc = (g ? widen(g[r * H + j]) : C(0)) + (grad_h_n ? widen(grad_h_n[r * H + j]) : C(0));
        dz[row + j] = narrow<T>(acc * dact_scalar(widen(out[row + j]), relu));
        if constexpr (kFloatScratch<T>) scratch.cur[r * H + j] = widen(dz[row + j]);
      }
    }
    scratch.swap();
  }
}

template <typename T>
void project_univariate(T* out, const T* x, const T* w, const T* b, int64_t rows, int64_t hidden) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  for (int64_t n = 0; n < rows; ++n) {
    const V xn = V{} + widen(x[n]);
    T* o = out + n * hidden;
    int64_t j = 0;
    for (; j + W <= hidden; j += W) store(o + j, (b ? load(b + j) : V{}) + xn * load(w + j));
    for (; j < hidden; ++j) o[j] = narrow<T>((b ? widen(b[j]) : compute_t<T>(0)) + widen(x[n]) * widen(w[j]));
  }
}

template <typename T>
void activate(T* y, int64_t n, bool relu) {
  using V = vec<T>;
  int64_t i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) store(y + i, act_vec(load(y + i), relu));
  for (; i < n; ++i) y[i] = narrow<T>(act_scalar(widen(y[i]), relu));
}

template <typename T>
void mul_dact(T* g, const T* y, int64_t n, bool relu) {
  using V = vec<T>;
  int64_t i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>)
    store(g + i, load(g + i) * dact_vec(load(y + i), relu));
  for (; i < n; ++i) g[i] = narrow<T>(widen(g[i]) * dact_scalar(widen(y[i]), relu));
}

// sum_k a[k] b[k], vectorized with one accumulator per lane.
template <typename T>
inline compute_t<T> dot(const T* a, const T* b, int64_t n) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    // 32 products a call, straight from bfloat16 storage; the tail by masked loads (zeros).
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32)
      acc = _mm512_dpbf16_ps(acc, bits_as<__m512bh>(_mm512_loadu_si512(a + k)),
                             bits_as<__m512bh>(_mm512_loadu_si512(b + k)));
    if (k < n) {
      const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (n - k)) - 1);
      acc = _mm512_dpbf16_ps(acc, bits_as<__m512bh>(_mm512_maskz_loadu_epi16(tail, a + k)),
                             bits_as<__m512bh>(_mm512_maskz_loadu_epi16(tail, b + k)));
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  using V = vec<T>;
  V acc{};
  int64_t k = 0;
  for (; k + kLanes<T> <= n; k += kLanes<T>) acc += load(a + k) * load(b + k);
  compute_t<T> sum = 0;
  for (int i = 0; i < kLanes<T>; ++i) sum += acc[i];
  for (; k < n; ++k) sum += widen(a[k]) * widen(b[k]);
  return sum;
}

template <typename T>
void cell(const T* x, const T* h, const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* y,
          int64_t batch, int64_t input, int64_t hidden, bool relu) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x + b * input;
    const T* hb = h + b * hidden;
    T* yb = y + b * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      compute_t<T> z = dot(xb, w_ih + j * input, input) + dot(hb, w_hh + j * hidden, hidden);
      if (b_ih) z += widen(b_ih[j]) + widen(b_hh[j]);
      yb[j] = narrow<T>(z);
    }
    activate(yb, hidden, relu);
  }
}

template <typename T>
constexpr Kernels<T> kernels_for() {
  constexpr Matrix matrix = std::is_same_v<T, bf16> && kPairs ? Matrix::kBf16Pairs
                            : kFloatScratch<T>                 ? Matrix::kFloat
                                                               : Matrix::kStorage;
  return {&forward<T>, &backward<T>, &project_univariate<T>, &activate<T>, &mul_dact<T>, &cell<T>, matrix};
}

}  // namespace
}  // namespace MYRNN_ISA

#define MYRNN_STR2(x) #x
#define MYRNN_STR(x) MYRNN_STR2(x)

const KernelTable& MYRNN_CAT(kernels_, MYRNN_ISA)() {
  static const KernelTable table{MYRNN_STR(MYRNN_ISA),          MYRNN_ISA::kernels_for<float>(),
                                 MYRNN_ISA::kernels_for<double>(), MYRNN_ISA::kernels_for<bf16>(),
                                 MYRNN_ISA::kernels_for<f16>(),    MYRNN_ISA::kConversions};
  return table;
}

}  // namespace myrnn_fast::cpu
