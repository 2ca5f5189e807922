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
#if defined(__SSE__) || defined(__F16C__) || defined(__AVX512F__)
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

// Register tiles: R rows by NV vectors of columns, with S sets of accumulators over alternating k.
// An FMA's result is ready some four cycles later and two issue a cycle, so a tile needs more
// than eight independent accumulators to keep both FMA pipes busy across its k loop; R NV S of
// them plus NV columns and a broadcast must fit the register file (32 vectors with AVX-512, 16
// below). Tiles of kMaxRows rows cover the batch, then 4, 2 and 1 row for what is left.
constexpr int kRegisters = kBytes == 64 ? 32 : 16;

constexpr int kMaxRows = kRegisters == 32 ? 8 : 4;
template <int R> constexpr int kWide = R == 1 || (R == 2 && kRegisters == 32) ? 4 : 2;  // NV of the widest tile
template <int R> constexpr int kSets = kRegisters == 32 ? (R == 8 ? 1 : 2) : (R == 4 ? 1 : 2);

template <typename To, typename From> inline To bits_as(From v) { return __builtin_bit_cast(To, v); }

// Every lane = s. Not `V{} + s`: adding +0 is not an identity (-0 + 0 = +0), so the compiler keeps
// a scalar add before each broadcast; `s - 0` is one, and folds to a plain (memory) broadcast.
template <typename V, typename S> inline V splat(S s) { return s - V{}; }

// ---- storage <-> registers: 16-bit values widen on load and round to nearest even on store --

// kLanes<S> values of S from p into a vector of compute_t<S>.
template <typename S> inline vec<S> load(const S* p) {
  vec<S> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__)
// 16 bfloat16 values (the low half of h) as floats in one vpermw: value i becomes the upper half
// of lane i, the lower halves zeroed by the mask.
inline vfloat widen_bf16(__m512i h) {
  const __m512i upper = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0,
                                         3, 0, 2, 0, 1, 0, 0, 0);
  return bits_as<vfloat>(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, upper, h));
}
#endif

// bfloat16 is float's upper half: widening is a shift. (GCC's code for the portable form below
// takes six instructions for a 64-byte vector; the intrinsics one or two.)
template <> inline vfloat load(const bf16* p) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__)
  return widen_bf16(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif MYRNN_VECTOR_BYTES == 32 && defined(__AVX2__)
  return bits_as<vfloat>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
  vbits16 h;
  std::memcpy(&h, p, sizeof h);
  return bits_as<vfloat>(__builtin_convertvector(h, vuint32) << 16);
#endif
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

// v rounded to the storage type S and widened back, without leaving the registers (what
// load(p) gives after store(p, v)).
template <typename S> inline vfloat rounded(vfloat v);
template <> inline vfloat rounded<bf16>(vfloat v) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BF16__)
  return widen_bf16(_mm512_castsi256_si512(bits_as<__m256i>(_mm512_cvtneps_pbh(bits_as<__m512>(v)))));
#endif
  const vuint32 b = bits_as<vuint32>(v);
  const vuint32 r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const vuint32 nan = bits_as<vuint32>(v != v);
  return bits_as<vfloat>(((nan & ((b >> 16) | 0x40u)) | (~nan & r)) << 16);
}
template <> inline vfloat rounded<f16>(vfloat v) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512F__)
  return bits_as<vfloat>(
      _mm512_cvtph_ps(_mm512_cvtps_ph(bits_as<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#elif MYRNN_VECTOR_BYTES == 32 && defined(__F16C__)
  return bits_as<vfloat>(
      _mm256_cvtph_ps(_mm256_cvtps_ph(bits_as<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#else
  return __builtin_convertvector(__builtin_convertvector(v, vhalf), vfloat);
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

// a b + c, one rounding where the target has FMA (two below it), the same wherever it is
// written: GCC contracts a separate product and sum into an FMA in some contexts and not in
// others, and the univariate projections must not differ between the pass and the tiles
// (Univariate). Elsewhere (AArch64's NEON, say) lane by lane, which the compiler vectorizes.
template <typename V> inline V madd(V a, V b, V c) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512F__)
  if constexpr (std::is_same_v<V, vfloat>)
    return bits_as<vfloat>(_mm512_fmadd_ps(bits_as<__m512>(a), bits_as<__m512>(b), bits_as<__m512>(c)));
  else
    return bits_as<vdouble>(_mm512_fmadd_pd(bits_as<__m512d>(a), bits_as<__m512d>(b), bits_as<__m512d>(c)));
#elif MYRNN_VECTOR_BYTES == 32 && defined(__FMA__)
  if constexpr (std::is_same_v<V, vfloat>)
    return bits_as<vfloat>(_mm256_fmadd_ps(bits_as<__m256>(a), bits_as<__m256>(b), bits_as<__m256>(c)));
  else
    return bits_as<vdouble>(_mm256_fmadd_pd(bits_as<__m256d>(a), bits_as<__m256d>(b), bits_as<__m256d>(c)));
#elif defined(__FP_FAST_FMAF) && defined(__FP_FAST_FMA)
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(a[0])); ++i) {
    if constexpr (std::is_same_v<V, vfloat>)
      a[i] = __builtin_fmaf(a[i], b[i], c[i]);  // not fma's double: that would round twice
    else
      a[i] = __builtin_fma(a[i], b[i], c[i]);
  }
  return a;
#else
  return a * b + c;  // no FMA instruction to contract into: two roundings, everywhere
#endif
}
template <typename C> inline C madd_scalar(C a, C b, C c) {
#if defined(__FP_FAST_FMAF) && defined(__FP_FAST_FMA)
  if constexpr (std::is_same_v<C, float>)
    return __builtin_fmaf(a, b, c);
  else
    return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

// n / d for float vectors with d > 0, to about an ulp: a reciprocal estimate refined by one
// Newton step on the quotient. A vector division has a throughput of one every several cycles
// and the nonlinearity needs one per vector; at small hidden sizes it cost as much as the step's
// multiply-adds.
inline vfloat quotient(vfloat n, vfloat d) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512F__)
  const vfloat r = bits_as<vfloat>(_mm512_rcp14_ps(bits_as<__m512>(d)));
#elif MYRNN_VECTOR_BYTES == 32 && defined(__AVX__)
  const vfloat r = bits_as<vfloat>(_mm256_rcp_ps(bits_as<__m256>(d)));
#elif MYRNN_VECTOR_BYTES == 16 && defined(__SSE__)
  const vfloat r = bits_as<vfloat>(_mm_rcp_ps(bits_as<__m128>(d)));
#else
  return n / d;
#endif
#if defined(__SSE__)
  const vfloat q = n * r;
  return q + r * (n - d * q);
#endif
}

// tanh for float vectors, within 5 ulp: x P(x^2) / Q(x^2), a [13/6] rational minimax
// approximation on |x| <= 7.905 (Eigen's fast tanh coefficients), where it reaches 1 - 4 ulp;
// +-1 from |x| = 9, where tanh rounds to it. Half the instructions of an exp-based tanh (it needs
// no range reduction, no scaling and no second formula near 0, where x P / Q has no cancellation),
// and it is a large share of a step at small hidden sizes. NaN stays NaN: no comparison lets it
// through. x = -0 gives -0.
inline vfloat tanh_vec(vfloat x) {
  constexpr float c = 7.90531110763549805f;
  const vint32 bits = bits_as<vint32>(x);
  const vfloat ax = bits_as<vfloat>(bits & INT32_MAX);
  const vfloat xc = ax > c ? bits_as<vfloat>((bits & INT32_MIN) | bits_as<vint32>(vfloat{} + c)) : x;
  const vfloat x2 = xc * xc;
  vfloat p = 2.00018790482477e-13f + x2 * -2.76076847742355e-16f;
  p = -8.60467152213735e-11f + x2 * p;
  p = 5.12229709037114e-08f + x2 * p;
  p = 1.48572235717979e-05f + x2 * p;
  p = 6.37261928875436e-04f + x2 * p;
  p = 4.89352455891786e-03f + x2 * p;
  vfloat q = 1.18534705686654e-04f + x2 * 1.19825839466702e-06f;
  q = 2.26843463243900e-03f + x2 * q;
  q = 4.89352518554385e-03f + x2 * q;
  const vfloat y = quotient(xc * p, q);
  return ax >= 9.0f ? bits_as<vfloat>((bits & INT32_MIN) | bits_as<vint32>(vfloat{} + 1.0f)) : y;
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

// The first n < kLanes<S> values of S at p, the other lanes zero; and the first n lanes of v
// stored at p: a row's last, partial vector, without touching memory past it. With AVX-512 a
// byte-masked load or store through a register-sized buffer (whole-width accesses, so the
// buffer's store forwards to its load); elsewhere a loop of fixed length, fully unrolled (a
// memcpy of n values would be a library call).
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__) && defined(__AVX512VL__)
// The byte mask of n values of S.
template <typename S> inline uint64_t first_bytes(int64_t n) { return (uint64_t{1} << (n * sizeof(S))) - 1; }
#endif
template <typename S> inline vec<S> load_first(const S* p, int64_t n) {
  constexpr int kBytes = kLanes<S> * static_cast<int>(sizeof(S));
  alignas(64) S buffer[kLanes<S>] = {};
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__) && defined(__AVX512VL__)
  const uint64_t mask = first_bytes<S>(n);
  if constexpr (kBytes == 64)
    _mm512_store_si512(buffer, _mm512_maskz_loadu_epi8(mask, p));
  else
    _mm256_store_si256(reinterpret_cast<__m256i*>(buffer), _mm256_maskz_loadu_epi8(static_cast<__mmask32>(mask), p));
#else
  (void)kBytes;
#pragma GCC unroll 64
  for (int c = 0; c < kLanes<S>; ++c)
    if (c < n) buffer[c] = p[c];
#endif
  return load(buffer);
}
template <typename S> inline void store_first(S* p, vec<S> v, int64_t n) {
  constexpr int kBytes = kLanes<S> * static_cast<int>(sizeof(S));
  alignas(64) S buffer[kLanes<S>];
  store(buffer, v);
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__) && defined(__AVX512VL__)
  const uint64_t mask = first_bytes<S>(n);
  if constexpr (kBytes == 64)
    _mm512_mask_storeu_epi8(p, mask, _mm512_load_si512(buffer));
  else
    _mm256_mask_storeu_epi8(p, static_cast<__mmask32>(mask), _mm256_load_si256(reinterpret_cast<const __m256i*>(buffer)));
#else
  (void)kBytes;
#pragma GCC unroll 64
  for (int c = 0; c < kLanes<S>; ++c)
    if (c < n) p[c] = buffer[c];
#endif
}

enum class Epilogue { kActivate, kMulDact };

// What one step computes for a block of rows: dst = epilogue(init + prev M). Row pointers are
// at the block's first row, with row stride H. T is the storage type of init, dst and y; A that
// of prev and M that of m (see Layout below): T itself, except where float16/bfloat16 kernels
// keep a float copy of the state and of m (kFloatScratch).
//
// The input projection x W_ih^T + b runs before the recurrence over all steps at once, as one
// BLAS GEMM or as `project` (ops/rnn_cpu.cpp measures which), both far faster per product than a
// step. Only univariate input (I = 1, the article's) is folded in as the tiles' start values
// (Univariate): its projection is one multiply-add per element, less than the pass over [N, H]
// that writes it and the step that reads it back.
template <typename T, typename A = T, typename M = T>
struct Operands {
  const T* init = nullptr;  // per-row start values, or null
  const A* prev = nullptr;  // the rows' previous state (forward) or next dz (backward)
  const M* m = nullptr;     // [H][H], in the layout of m_index
  T* dst = nullptr;
  float* dst_float = nullptr;  // with a float scratch: dst's values again, widened, for the next step
  const T* y = nullptr;        // the saved output, for the backward epilogue
  // Instead of init, univariate input: the start values are its projections (see Univariate).
  const T* x = nullptr;  // the rows' inputs, one per row
  const compute_t<T>* w = nullptr;
  const compute_t<T>* bias = nullptr;
  int64_t H = 0;
  bool relu = false;

  Operands at_row(int64_t r) const {
    Operands o = *this;
    auto shift = [r](auto* p, int64_t stride) { return p ? p + r * stride : p; };
    o.init = shift(init, H);
    o.x = shift(x, 1);
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

// Whether kernels over storage T with the matrix in M keep the float scratch: exactly when M is
// float and T is not. That is matrix_t<T>'s choice, or, for bfloat16 with pairs, the float32-products
// variant (Kernels<bf16> of KernelTable::b16_float).
template <typename T, typename M> constexpr bool kScratch = std::is_same_v<M, float> && !std::is_same_v<T, float>;

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
      const V p = splat<V>(widen(a[r * H + kk]));
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

// Univariate input's projection x w + b at columns [j, j + lanes), and at column j alone: the one
// formula of project_univariate and of the tiles' start values (Univariate), before rounding.
template <typename T>
inline vec<T> projected(compute_t<T> x, const compute_t<T>* w, const compute_t<T>* bias, int64_t j) {
  using V = vec<T>;
  return madd(splat<V>(x), load(w + j), bias ? load(bias + j) : V{});
}
template <typename T>
inline compute_t<T> projected_scalar(compute_t<T> x, const compute_t<T>* w, const compute_t<T>* bias, int64_t j) {
  return madd_scalar(x, w[j], bias ? bias[j] : compute_t<T>(0));
}

// Row r's start values at columns [j, j + lanes): init's, or univariate input's projections,
// rounded as project_univariate stores them.
template <typename T, typename A, typename M>
inline vec<T> start(const Operands<T, A, M>& o, int r, int64_t j) {
  if (o.x) {
    const vec<T> p = projected<T>(widen(o.x[r]), o.w, o.bias, j);
    if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return rounded<T>(p);
    return p;
  }
  return o.init ? load(o.init + r * o.H + j) : vec<T>{};
}
template <typename T, typename A, typename M>
inline compute_t<T> start_scalar(const Operands<T, A, M>& o, int r, int64_t j) {
  if (o.x) return widen(narrow<T>(projected_scalar<T>(widen(o.x[r]), o.w, o.bias, j)));
  return o.init ? widen(o.init[r * o.H + j]) : compute_t<T>(0);
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
      acc[0][r][v] = start(o, r, j + v * W);
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
      // The float state is the stored value widened back, computed in registers: reading dst
      // back would put a store-to-load round trip on the step's critical path.
      if constexpr (kScratch<T, M>) store(o.dst_float + at, rounded<T>(out));
    }
}

// R rows at the n < W columns from j that end each row: tile<T, R, 1, ...> with its loads and
// stores cut to n lanes. Columns of m are read as whole vectors where that stays inside m (lanes
// past n then read m's next row, and are never stored), else cut to n lanes too.
template <typename T, int R, int S, Epilogue E, typename A, typename M>
inline void partial_tile(const Operands<T, A, M>& o, int64_t j, int64_t n) {
  using V = vec<T>;
  const int64_t H = o.H;
  V acc[S][R];
  for (int r = 0; r < R; ++r) {
    if (o.x) {
      const V p = madd(splat<V>(widen(o.x[r])), load_first(o.w + j, n), o.bias ? load_first(o.bias + j, n) : V{});
      if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>)
        acc[0][r] = rounded<T>(p);
      else
        acc[0][r] = p;
    } else {
      acc[0][r] = o.init ? load_first(o.init + r * H + j, n) : V{};
    }
    for (int set = 1; set < S; ++set) acc[set][r] = V{};
  }
  const auto one = [&](int set, int64_t k, const V& col) {
    for (int r = 0; r < R; ++r) acc[set][r] += splat<V>(widen(o.prev[r * H + k])) * col;
  };
  // Rows k whose whole vector k H + j + [0, W) lies inside m's H x H values.
  const int64_t past = H * H - j - kLanes<T>;
  const int64_t whole = past < 0 ? 0 : std::min(H - 1, past / H + 1);
  int64_t k = 0;
  for (; k + S <= whole; k += S)
    for (int set = 0; set < S; ++set) one(set, k + set, load(o.m + (k + set) * H + j));
  for (; k < whole; ++k) one(0, k, load(o.m + k * H + j));
  for (; k < H; ++k) one(0, k, load_first(o.m + k * H + j, n));
  for (int r = 0; r < R; ++r) {
    V sum = acc[0][r];
    for (int set = 1; set < S; ++set) sum += acc[set][r];
    const V out = E == Epilogue::kActivate ? act_vec(sum, o.relu)
                                           : sum * dact_vec(load_first(o.y + r * H + j, n), o.relu);
    store_first(o.dst + r * H + j, out, n);
    if constexpr (kScratch<T, M>) store_first(o.dst_float + r * H + j, rounded<T>(out), n);
  }
}

// R rows over all H columns: the widest register tiles, then narrower, then the partial vector
// that ends each row (scalar columns with bfloat16 pairs, whose m holds two rows per vector).
template <typename T, int R, Epilogue E, typename A, typename M>
inline void rows(const Operands<T, A, M>& o) {
  constexpr int W = kLanes<T>;
  constexpr int NV = kWide<R>, S = kSets<R>;
  const int64_t H = o.H;
  int64_t j = 0;
  for (; j + NV * W <= H; j += NV * W) tile<T, R, NV, S, E>(o, j);
  if constexpr (NV > 2)
    for (; j + 2 * W <= H; j += 2 * W) tile<T, R, 2, S, E>(o, j);
  for (; j + W <= H; j += W) tile<T, R, 1, S, E>(o, j);
  if (j == H) return;
  if constexpr (!(std::is_same_v<M, bf16> && kPairs)) {
    partial_tile<T, R, S, E>(o, j, H - j);
    return;
  }
  // The columns past the last full vector (all of them where H < W), as scalars: every column's
  // sum over k at once, so that their multiply-adds are independent chains (one chain per
  // column, k inner, is latency-bound: H x 4 cycles a column). Each sum runs over k in order.
  using C = compute_t<T>;
  const int64_t n = H - j;
  for (int r = 0; r < R; ++r) {
    C acc[W];
    for (int64_t c = 0; c < n; ++c) acc[c] = start_scalar(o, r, j + c);
    for (int64_t k = 0; k < H; ++k) {
      const C p = widen(o.prev[r * H + k]);
      for (int64_t c = 0; c < n; ++c) acc[c] += p * widen(o.m[m_index<M>(k, j + c, H)]);
    }
    // The activation as one vector (libm's tanh per element took more than the sums).
    vec<T> z{};
    for (int64_t c = 0; c < n; ++c) z[c] = acc[c];
    if constexpr (E == Epilogue::kActivate) z = act_vec(z, o.relu);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t at = r * H + j + c;
      o.dst[at] = narrow<T>(E == Epilogue::kActivate ? z[c] : z[c] * dact_scalar(widen(o.y[at]), o.relu));
      if constexpr (kScratch<T, M>) o.dst_float[at] = widen(o.dst[at]);
    }
  }
}

// Rows [r0, r1) of one step: tiles of kMaxRows rows, then of 4, 2 and 1.
template <typename T, Epilogue E, typename A, typename M>
inline void step_rows(const Operands<T, A, M>& o, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kMaxRows <= r1; r += kMaxRows) rows<T, kMaxRows, E>(o.at_row(r));
  if constexpr (kMaxRows > 4)
    if (r + 4 <= r1) rows<T, 4, E>(o.at_row(r)), r += 4;
  if (r + 2 <= r1) rows<T, 2, E>(o.at_row(r)), r += 2;
  if (r < r1) rows<T, 1, E>(o.at_row(r));
}

// With kScratch<T, M>, the float state of rows [0, r1): the previous step's and the current
// one's, swapped after every step (indexed by absolute row, so rows [r0, r1) of both are used).
template <typename T, typename M>
struct StateScratch {
  using A = std::conditional_t<kScratch<T, M>, float, T>;
  std::vector<float> buffer;
  float* prev = nullptr;
  float* cur = nullptr;
  StateScratch(int64_t rows, int64_t H) {
    if constexpr (kScratch<T, M>) {
      buffer.resize(2 * rows * H);
      prev = buffer.data();
      cur = prev + rows * H;
    }
  }
  void swap() { std::swap(prev, cur); }
};

template <typename T, typename M = matrix_t<T>>
void forward(const Sequence& s, T* out, const Univariate<T>* u, const T* h0, const void* w_hh_t, T* h_n, bool relu,
             int64_t r0, int64_t r1) {
  const int64_t H = s.hidden;
  StateScratch<T, M> scratch(r1, H);
  Operands<T, typename StateScratch<T, M>::A, M> o;
  o.m = static_cast<const M*>(w_hh_t);
  o.H = H;
  o.relu = relu;
  if (u) {
    o.w = u->w;
    o.bias = u->bias;
  }
  if constexpr (kScratch<T, M>) {
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
    if (u)
      o.x = u->x + step.offset;
    else
      o.init = cur;
    o.dst_float = scratch.cur;
    step_rows<T, Epilogue::kActivate>(o, r0, active);
    // Rows whose sequence ends here: their state is final.
    const int64_t first_done = std::max(r0, std::min(active, step.next_batch_size));
    if (active > first_done)
      std::memcpy(h_n + first_done * H, cur + first_done * H, (active - first_done) * H * sizeof(T));
    if constexpr (kScratch<T, M>) {
      scratch.swap();
      o.prev = scratch.prev;
    } else {
      o.prev = cur;
    }
  }
}

template <typename T, typename M = matrix_t<T>>
void backward(const Sequence& s, T* dz, const T* grad_out, const T* grad_h_n, const T* out, const void* w_hh,
              bool relu, int64_t r0, int64_t r1) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  const int64_t H = s.hidden;
  StateScratch<T, M> scratch(r1, H);
  for (int64_t t = s.seq_len - 1; t >= 0; --t) {
    const Step step = step_at(s, t);
    const int64_t active = std::min(r1, step.batch_size);
    if (active <= r0) continue;  // this chunk's rows start later in the (reversed) sequence
    const int64_t base = step.offset * H;
    const T* g = grad_out ? grad_out + base : nullptr;
    // Rows still running at t+1 receive dz_{t+1} W_hh ...
    const int64_t carried = std::max(r0, std::min(active, step.next_batch_size));
    if (carried > r0) {
      Operands<T, typename StateScratch<T, M>::A, M> o;
      o.init = g;
      if constexpr (kScratch<T, M>)
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
        if constexpr (kScratch<T, M>) store(scratch.cur + r * H + j, load(dz + row + j));
      }
      for (; j < H; ++j) {
        using C = compute_t<T>;
        const C acc = (g ? widen(g[r * H + j]) : C(0)) + (grad_h_n ? widen(grad_h_n[r * H + j]) : C(0));
        dz[row + j] = narrow<T>(acc * dact_scalar(widen(out[row + j]), relu));
        if constexpr (kScratch<T, M>) scratch.cur[r * H + j] = widen(dz[row + j]);
      }
    }
    scratch.swap();
  }
}

// ---- the weight gradients without GEMM calls (Kernels::grads) --------------------------------

template <typename T> inline compute_t<T> dot(const T* a, const T* b, int64_t n);

// The sum of a vector's lanes by halves (lanes [0, n/2) plus [n/2, n), and so on down to one):
// log2(lanes) shuffles and adds, where adding lane by lane is one chain of dependent scalar adds
// (16 of them, 4 cycles each, for float32 in AVX-512), which set the pace of grad x at input size 1.
template <typename V, std::size_t... L> inline auto half_sum(V v, std::index_sequence<L...>) {
  return __builtin_shufflevector(v, v, L...) + __builtin_shufflevector(v, v, (L + sizeof...(L))...);
}
template <typename V> inline auto lane_sum(V v) {
  constexpr std::size_t n = sizeof(V) / sizeof(v[0]);
  if constexpr (n == 1) {
    return v[0];
  } else {
    return lane_sum(half_sum(v, std::make_index_sequence<n / 2>{}));
  }
}

// Calls fn(n, prev) for each row n of rows [r0, r1) at every step, prev being the row it continues
// (h0's row at step 0): the pairs every weight gradient sums over.
template <typename T, typename F>
inline void for_each_row(const Sequence& s, const T* h0, const T* y, int64_t r0, int64_t r1, const F& fn) {
  const int64_t H = s.hidden;
  int64_t prev_offset = 0;
  for (int64_t t = 0; t < s.seq_len; ++t) {
    const Step step = step_at(s, t);
    const int64_t active = std::min(r1, step.batch_size);
    if (active <= r0) break;
    for (int64_t r = r0; r < active; ++r)
      fn(step.offset + r, t == 0 ? h0 + r * H : y + (prev_offset + r) * H);
    prev_offset = step.offset;
  }
}

// acc[k][j] += sum_n b_n[k] a_n[j] over the rows, for k in [k0, k0 + KR) and the JV vectors of j
// from j0: KR JV accumulators stay in registers over all rows (a_n: dz's rows, H wide; b_n: the
// previous states' or the inputs' rows, K wide).
template <typename T, int KR, int JV, typename C, typename Rows>
inline void outer_tile(C* acc, const Rows& rows, int64_t H, int64_t k0, int64_t j0) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  V sum[KR][JV] = {};
  rows([&](const T* a, const T* b) {
    V col[JV];
    for (int v = 0; v < JV; ++v) col[v] = load(a + j0 + v * W);
    for (int kr = 0; kr < KR; ++kr) {
      const V p = splat<V>(widen(b[k0 + kr]));
      for (int v = 0; v < JV; ++v) sum[kr][v] += p * col[v];
    }
  });
  for (int kr = 0; kr < KR; ++kr)
    for (int v = 0; v < JV; ++v) {
      C* out = acc + (k0 + kr) * H + j0 + v * W;
      store(out, load(out) + sum[kr][v]);
    }
}

// acc [K][H] += sum_n b_n^T a_n over the rows (grad W^T of a product whose input rows are b_n).
template <typename T, typename C, typename Rows>
void outer_sum(C* acc, const Rows& rows, int64_t H, int64_t K) {
  constexpr int W = kLanes<T>;
  constexpr int KR = kRegisters == 32 ? 8 : 4;
  int64_t j = 0;
  for (; j + 2 * W <= H; j += 2 * W) {
    int64_t k = 0;
    for (; k + KR <= K; k += KR) outer_tile<T, KR, 2>(acc, rows, H, k, j);
    for (; k < K; ++k) outer_tile<T, 1, 2>(acc, rows, H, k, j);
  }
  for (; j + W <= H; j += W) {
    int64_t k = 0;
    for (; k + KR <= K; k += KR) outer_tile<T, KR, 1>(acc, rows, H, k, j);
    for (; k < K; ++k) outer_tile<T, 1, 1>(acc, rows, H, k, j);
  }
  if (j < H)
    rows([&](const T* a, const T* b) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t jj = j; jj < H; ++jj) acc[k * H + jj] += widen(b[k]) * widen(a[jj]);
    });
}

// out[r][c] = sum_j a[r][j] m[j][c] for `count` rows of a (row stride H) and m [H][width]: each
// tile of R rows and NV vectors of c keeps its sums in registers over j.
template <typename T, int R, int NV>
inline void product_tile(const T* a, int64_t H, const T* m, int64_t width, const T* bias, T* out, int64_t c) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  V sum[R][NV];
  for (int v = 0; v < NV; ++v) {
    const V start = bias ? load(bias + c + v * W) : V{};
    for (int r = 0; r < R; ++r) sum[r][v] = start;
  }
  for (int64_t j = 0; j < H; ++j) {
    V col[NV];
    for (int v = 0; v < NV; ++v) col[v] = load(m + j * width + c + v * W);
    for (int r = 0; r < R; ++r) {
      const V p = splat<V>(widen(a[r * H + j]));
      for (int v = 0; v < NV; ++v) sum[r][v] += p * col[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * width + c + v * W, sum[r][v]);
}

// The columns of m past its last full vector, transposed ([c][j]), so that each of their sums
// is a dot product over contiguous j: with a narrow m (grad x at input size 1) these are all the
// columns, and a scalar loop over j would be one long chain of dependent multiply-adds.
template <typename T>
std::vector<T> tail_columns(const T* m, int64_t H, int64_t width, int64_t c0) {
  std::vector<T> t((width - c0) * H);
  for (int64_t c = c0; c < width; ++c)
    for (int64_t j = 0; j < H; ++j) t[(c - c0) * H + j] = m[j * width + c];
  return t;
}

template <typename T, int R>
inline void product_rows(const T* a, int64_t H, const T* m, int64_t width, const T* bias, const T* tail, T* out) {
  constexpr int W = kLanes<T>;
  int64_t c = 0;
  for (; c + 2 * W <= width; c += 2 * W) product_tile<T, R, 2>(a, H, m, width, bias, out, c);
  for (; c + W <= width; c += W) product_tile<T, R, 1>(a, H, m, width, bias, out, c);
  for (const int64_t c0 = c; c < width; ++c)
    for (int r = 0; r < R; ++r)
      out[r * width + c] = narrow<T>((bias ? widen(bias[c]) : 0) + dot(a + r * H, tail + (c - c0) * H, H));
}

// out = bias + a m for `count` rows of a (row stride H), m [H][width], bias [width] or null;
// `tail` is tail_columns(m, H, width, width / W * W), which callers making many products with
// one m build once.
template <typename T>
void product_with(const T* a, int64_t count, int64_t H, const T* m, int64_t width, T* out, const T* tail,
                  const T* bias = nullptr) {
  int64_t r = 0;
  for (; r + kMaxRows <= count; r += kMaxRows)
    product_rows<T, kMaxRows>(a + r * H, H, m, width, bias, tail, out + r * width);
  if constexpr (kMaxRows > 4)
    if (r + 4 <= count) product_rows<T, 4>(a + r * H, H, m, width, bias, tail, out + r * width), r += 4;
  for (; r < count; ++r) product_rows<T, 1>(a + r * H, H, m, width, bias, tail, out + r * width);
}

template <typename T>
void product(const T* a, int64_t count, int64_t H, const T* m, int64_t width, T* out, const T* bias = nullptr) {
  constexpr int W = kLanes<T>;
  product_with(a, count, H, m, width, out, tail_columns(m, H, width, width / W * W).data(), bias);
}

// The rows grads sums a chunk at a time: as many as leave their operands (dz's and the previous
// states' rows, H values each, and the inputs', I) in half of a 48 KiB L1 (three quarters of a
// 32 KiB one), so that every tile of the sums reads them from there. One pass over all rows per
// tile streamed them from L2 once per tile, and took twice the multiply-adds' time (grad W_hh at
// (176, 25, 1, 32): 4 tiles).
constexpr int64_t kChunkBytes = 24 << 10;
// Past H = 96 the chunk is kMinChunkRows rows, for the sums' loads and stores of `acc` (once
// per tile and chunk) to stay a small share of the tiles' multiply-adds.
constexpr int64_t kMinChunkRows = 32;
constexpr int64_t kMaxChunkRows = 256;
template <typename T> inline int64_t chunk_rows(int64_t H, int64_t I) {
  return std::clamp<int64_t>(kChunkBytes / static_cast<int64_t>((2 * H + I) * sizeof(T)), kMinChunkRows, kMaxChunkRows);
}

// The weight gradients' sums over one chunk of rows, added to `acc` (laid out as Kernels::grads
// fills it): chunk row c is dz(c), which continues the state prev(c) from input x(c), each a row
// pointer in the type the sums read (T's compute type).
template <typename T, typename C, typename Dz, typename Prev, typename X>
void chunk_sums(C* acc, int64_t H, int64_t I, int64_t count, const Dz& dz, const Prev& prev, const X& x) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  outer_sum<T>(acc, [&](const auto& fn) { for (int64_t c = 0; c < count; ++c) fn(dz(c), prev(c)); }, H, H);
  outer_sum<T>(acc + H * H, [&](const auto& fn) { for (int64_t c = 0; c < count; ++c) fn(dz(c), x(c)); }, H, I);
  C* acc_b = acc + H * H + I * H;
  int64_t j = 0;
  for (; j + W <= H; j += W) {  // four sums, so that the adds do not wait on each other
    V sum[4] = {};
    int64_t c = 0;
    for (; c + 4 <= count; c += 4)
      for (int u = 0; u < 4; ++u) sum[u] += load(dz(c + u) + j);
    for (; c < count; ++c) sum[0] += load(dz(c) + j);
    store(acc_b + j, load(acc_b + j) + ((sum[0] + sum[1]) + (sum[2] + sum[3])));
  }
  for (; j < H; ++j) {
    C sum = 0;
    for (int64_t c = 0; c < count; ++c) sum += widen(dz(c)[j]);
    acc_b[j] += sum;
  }
}

// The 16-bit projection (project, below) widens its input in chunks of this many rows: each
// chunk's float32 copy stays in L1/L2 while every tile of the product passes over it.
constexpr int64_t kWidenedRows = 64;

template <typename T>
void widen_row(const T* src, float* dst, int64_t n) {
  constexpr int W = kLanes<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = widen(src[i]);
}

template <typename T>
void narrow_row(const compute_t<T>* src, T* dst, int64_t n) {
  constexpr int W = kLanes<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = narrow<T>(src[i]);
}

// grads for float16 and bfloat16 storage. Each tile of the weight-gradient sums passes over every
// row, and 16-bit operands would be widened again on every pass: a scalar widening per broadcast
// and a conversion per loaded vector, nearly doubling the instructions of float32's tiles (where
// the broadcast folds into the FMA). So the rows are widened once, a chunk (chunk_rows) at a time
// into scratch that stays in cache, and float32's tiles sum them: the same products of the same
// values in float32. The weights of grad x are widened once per call (an H x I float32 copy).
// grad h0 (B rows) keeps the 16-bit product.
template <typename T>
void grads_widened(const Sequence& s, int64_t I, const T* dz, const T* x, const T* h0, const T* y, const T* w_ih,
                   const T* w_hh, void* acc_v, T* grad_x, T* grad_h0, int64_t r0, int64_t r1) {
  const int64_t K = chunk_rows<float>(s.hidden, I);
  const int64_t H = s.hidden;
  float* acc_hh = static_cast<float*>(acc_v);
  std::vector<float> scratch(K * (2 * H + I) + (grad_x ? K * I + H * I : 0));
  float* dzf = scratch.data();
  float* prevf = dzf + K * H;
  float* xf = prevf + K * H;
  float* gxf = xf + K * I;    // grad x of a chunk's rows, before rounding
  float* w_ihf = gxf + K * I;
  if (grad_x) widen_row(w_ih, w_ihf, H * I);
  int64_t rows[kMaxChunkRows];    // the chunk's rows n, in order
  const T* prevs[kMaxChunkRows];  // and the states they continue
  int64_t count = 0;
  const auto flush = [&] {
    // Widened run by run: a step's rows are consecutive, and so are the states they continue
    // (the previous step's rows), so a dense sequence's chunk is one run of each.
    for (int64_t c = 0, end; c < count; c = end) {
      for (end = c + 1; end < count && rows[end] == rows[c] + (end - c) && prevs[end] == prevs[c] + (end - c) * H;)
        ++end;
      widen_row(dz + rows[c] * H, dzf + c * H, (end - c) * H);
      widen_row(x + rows[c] * I, xf + c * I, (end - c) * I);
      widen_row(prevs[c], prevf + c * H, (end - c) * H);
    }
    chunk_sums<float>(acc_hh, H, I, count, [&](int64_t c) { return dzf + c * H; },
                      [&](int64_t c) { return prevf + c * H; }, [&](int64_t c) { return xf + c * I; });
    if (grad_x) {
      product(dzf, count, H, w_ihf, I, gxf);
      for (int64_t c = 0; c < count; ++c) narrow_row(gxf + c * I, grad_x + rows[c] * I, I);
    }
    count = 0;
  };
  for_each_row(s, h0, y, r0, r1, [&](int64_t n, const T* prev) {
    rows[count] = n;
    prevs[count++] = prev;
    if (count == K) flush();
  });
  if (count > 0) flush();
  if (grad_h0) product(dz + r0 * H, r1 - r0, H, w_hh, H, grad_h0 + r0 * H);  // step 0's rows are rows [0, B)
}

// out = x w_t + bias for `rows` rows of x [rows, I], w_t [I][H] and bias [H] (or null) in the
// compute type. 16-bit storage widens x a chunk of kWidenedRows rows at a time, as grads_widened
// does, so that float32's tiles run on it; the chunk's sums are rounded once, by vector stores.
template <typename T>
void project(T* out, const T* x, const typename Accumulator<T>::type* w_t, const typename Accumulator<T>::type* bias,
             int64_t rows, int64_t I, int64_t H) {
  if constexpr (std::is_same_v<T, compute_t<T>>) {
    product(x, rows, I, w_t, H, out, bias);
  } else {
    constexpr int64_t K = kWidenedRows;
    std::vector<float> scratch(K * (I + H));
    float* xf = scratch.data();
    float* of = xf + K * I;
    for (int64_t r = 0; r < rows; r += K) {
      const int64_t count = std::min(K, rows - r);
      widen_row(x + r * I, xf, count * I);
      product(xf, count, I, w_t, H, of, bias);
      narrow_row(of, out + r * H, count * H);
    }
  }
}

template <typename T>
void grads(const Sequence& s, int64_t input, const T* dz, const T* x, const T* h0, const T* y, const T* w_ih,
           const T* w_hh, void* acc_v, T* grad_x, T* grad_h0, int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
    grads_widened(s, input, dz, x, h0, y, w_ih, w_hh, acc_v, grad_x, grad_h0, r0, r1);
    return;
  }
  using C = typename Accumulator<T>::type;
  constexpr int W = kLanes<T>;
  const int64_t H = s.hidden, I = input;
  C* acc = static_cast<C*>(acc_v);
  // The rows a chunk at a time (their dz, previous states and inputs stay in L1 while every tile
  // of the sums passes over them): grad W_hh, dz rows against the states they continue; grad W_ih,
  // against the inputs; grad b, their sum.
  const int64_t K = chunk_rows<T>(H, I);
  const T* dzs[kMaxChunkRows];
  const T* prevs[kMaxChunkRows];
  const T* xs[kMaxChunkRows];
  int64_t count = 0;
  const auto flush = [&] {
    chunk_sums<T>(acc, H, I, count, [&](int64_t c) { return dzs[c]; }, [&](int64_t c) { return prevs[c]; },
                  [&](int64_t c) { return xs[c]; });
    count = 0;
  };
  for_each_row(s, h0, y, r0, r1, [&](int64_t n, const T* prev) {
    dzs[count] = dz + n * H;
    prevs[count] = prev;
    xs[count++] = x + n * I;
    if (count == K) flush();
  });
  if (count > 0) flush();
  if (grad_h0) product(dz + r0 * H, r1 - r0, H, w_hh, H, grad_h0 + r0 * H);  // step 0's rows are rows [0, B)
  if (!grad_x) return;
  // grad x = dz W_ih, a step's rows at a time (they are contiguous), or all rows as one block.
  const std::vector<T> tail = tail_columns(w_ih, H, I, I / W * W);
  if (r0 == 0 && r1 == s.batch) {  // all rows: one block, so that tiles span steps (at B = 1 too)
    const Step last = step_at(s, s.seq_len - 1);
    product_with(dz, last.offset + last.batch_size, H, w_ih, I, grad_x, tail.data());
    return;
  }
  for (int64_t t = 0; t < s.seq_len; ++t) {
    const Step step = step_at(s, t);
    const int64_t active = std::min(r1, step.batch_size);
    if (active <= r0) break;
    const int64_t n = step.offset + r0;
    product_with(dz + n * H, active - r0, H, w_ih, I, grad_x + n * I, tail.data());
  }
}

template <typename T>
void grads_finish(const void* acc_v, int64_t parts, int64_t stride, int64_t H, int64_t I, T* grad_w_hh,
                  T* grad_w_ih, T* grad_b) {
  // The parts' sums first, vector by vector (in the order part 0, 1, ...), then each gradient row
  // gathered from the transposed sums and rounded by vector stores: for 16-bit storage a scalar
  // rounding per value costs as much as the whole gather.
  using C = typename Accumulator<T>::type;
  constexpr int W = kLanes<T>;
  const C* acc = static_cast<const C*>(acc_v);
  const int64_t n = grads_size(H, I);
  std::vector<C> sum(acc, acc + n);
  for (int64_t p = 1; p < parts; ++p) {
    const C* part = acc + p * stride;
    int64_t i = 0;
    for (; i + W <= n; i += W) store(sum.data() + i, load(sum.data() + i) + load(part + i));
    for (; i < n; ++i) sum[i] += part[i];
  }
  std::vector<C> row(std::max(H, I));
  for (int64_t j = 0; j < H; ++j) {
    for (int64_t k = 0; k < H; ++k) row[k] = sum[k * H + j];
    narrow_row(row.data(), grad_w_hh + j * H, H);
  }
  for (int64_t j = 0; j < H; ++j) {
    for (int64_t i = 0; i < I; ++i) row[i] = sum[H * H + i * H + j];
    narrow_row(row.data(), grad_w_ih + j * I, I);
  }
  narrow_row(sum.data() + H * H + I * H, grad_b, H);
}

// out[n] = x[n] w + b for univariate input, with w and b in the compute type (widened and summed
// once per call by the caller, not once per row: for float16/bfloat16 that was most of the
// instructions).
template <typename T>
void project_univariate(T* out, const Univariate<T>& u, int64_t rows, int64_t hidden) {
  constexpr int W = kLanes<T>;
  for (int64_t n = 0; n < rows; ++n) {
    const compute_t<T> xn = widen(u.x[n]);
    T* o = out + n * hidden;
    int64_t j = 0;
    for (; j + W <= hidden; j += W) store(o + j, projected<T>(xn, u.w, u.bias, j));
    for (; j < hidden; ++j) o[j] = narrow<T>(projected_scalar<T>(xn, u.w, u.bias, j));
  }
}

template <typename T>
void activate(T* y, int64_t n, bool relu) {
  int64_t i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) store(y + i, act_vec(load(y + i), relu));
  for (; i < n; ++i) y[i] = narrow<T>(act_scalar(widen(y[i]), relu));
}

template <typename T>
void mul_dact(T* g, const T* y, int64_t n, bool relu) {
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
  compute_t<T> sum = lane_sum(acc);
  for (; k < n; ++k) sum += widen(a[k]) * widen(b[k]);
  return sum;
}

#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__)
// The four sums of a0..a3's lanes.
inline void sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* out) {
  // 128-bit lanes: [a0 + a0 upper half, a1 + a1 upper half], the same for a2, a3; then one lane
  // per vector; then the four values within each lane.
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(1, 0, 3, 2)));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(2, 3, 0, 1)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, u);
  for (int i = 0; i < 4; ++i) out[i] = lanes[4 * i];
}

// Sixteen values of p as floats: those the mask selects, zeros for the rest (nothing is read
// past them).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const f16* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  return bits_as<__m512>(widen_bf16(_mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, p))));
}

// acc[r][c] += the products a[r][k] w[c][k] for k < n, for 4 rows a[r] and 4 rows w[c], lane by
// lane: each loaded vector feeds four FMAs (16 k a block; with AVX512-BF16, bfloat16 takes 32 k
// a block by vdpbf16ps, straight from storage). The caller reduces the lanes once, after both of
// a step's products (a reduction costs as much as a few blocks of products).
template <typename T>
inline void add_products4x4(const T* const (&a)[4], const T* const (&w)[4], int64_t n, __m512 (&acc)[4][4]) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    const auto block = [&](int64_t k, __mmask32 mask) {
      __m512bh av[4], wv[4];
      for (int r = 0; r < 4; ++r) av[r] = bits_as<__m512bh>(_mm512_maskz_loadu_epi16(mask, a[r] + k));
      for (int c = 0; c < 4; ++c) wv[c] = bits_as<__m512bh>(_mm512_maskz_loadu_epi16(mask, w[c] + k));
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av[r], wv[c]);
    };
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) block(k, ~__mmask32{0});
    if (k < n) block(k, static_cast<__mmask32>((uint64_t{1} << (n - k)) - 1));
    return;
  }
#endif
  const auto block = [&](int64_t k, __mmask16 mask) {
    __m512 av[4], wv[4];
    for (int r = 0; r < 4; ++r) av[r] = load16(a[r] + k, mask);
    for (int c = 0; c < 4; ++c) wv[c] = load16(w[c] + k, mask);
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(av[r], wv[c], acc[r][c]);
  };
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) block(k, __mmask16{0xFFFF});
  if (k < n) block(k, static_cast<__mmask16>((1u << (n - k)) - 1));
}

// Rows i0 .. i0 + 3 of a [n, input] and b [n, hidden], the last row repeated past n - 1.
template <typename T>
inline void four_rows(const T* a, const T* b, int64_t i0, int64_t n, int64_t input, int64_t hidden,
                      const T* (&ra)[4], const T* (&rb)[4]) {
  for (int i = 0; i < 4; ++i) {
    const int64_t row = std::min(i0 + i, n - 1);
    ra[i] = a + row * input;
    rb[i] = b + row * hidden;
  }
}

// The cell step (float32 and the 16-bit types) in blocks of 4 rows by 4 units: each vector
// loaded from x, h or a weight row serves four units or rows, where a row-by-row dot product
// loads two vectors per FMA. A block past the last row or unit repeats the last one (and stores
// nothing for it), so every value is the same sum whatever its position.
template <typename T>
inline void cell_blocks(const T* x, const T* h, const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* y,
                        int64_t batch, int64_t input, int64_t hidden) {
  for (int64_t b = 0; b < batch; b += 4) {
    const T *xr[4], *hr[4];
    four_rows(x, h, b, batch, input, hidden, xr, hr);
    for (int64_t j = 0; j < hidden; j += 4) {
      const T *wi[4], *wh[4];
      four_rows(w_ih, w_hh, j, hidden, input, hidden, wi, wh);
      __m512 acc[4][4];
      for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
      add_products4x4(xr, wi, input, acc);
      add_products4x4(hr, wh, hidden, acc);
      float z[4][4];
      for (int r = 0; r < 4; ++r) sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], z[r]);
      for (int r = 0; r < 4 && b + r < batch; ++r)
        for (int c = 0; c < 4 && j + c < hidden; ++c) {
          float v = z[r][c];
          if (b_ih) v += widen(b_ih[j + c]) + widen(b_hh[j + c]);
          y[(b + r) * hidden + j + c] = narrow<T>(v);
        }
    }
  }
}
#endif

template <typename T>
void cell(const T* x, const T* h, const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, T* y,
          int64_t batch, int64_t input, int64_t hidden, bool relu) {
#if MYRNN_VECTOR_BYTES == 64 && defined(__AVX512BW__)
  if constexpr (!std::is_same_v<T, double>) {
    cell_blocks(x, h, w_ih, w_hh, b_ih, b_hh, y, batch, input, hidden);
    for (int64_t b = 0; b < batch; ++b) activate(y + b * hidden, hidden, relu);
    return;
  }
#endif
  int64_t b = 0;
  for (; b < batch; ++b) {
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
  return {&forward<T>,  &backward<T>, &project_univariate<T>, &project<T>, &activate<T>, &mul_dact<T>,
          &cell<T>,     &grads<T>,    &grads_finish<T>,       matrix};
}

// bfloat16 by float32 products: the recurrences with the float scratch and m in float32, the rest
// as kernels_for<bf16>().
constexpr Kernels<bf16> kernels_for_bf16_float() {
  Kernels<bf16> k = kernels_for<bf16>();
  k.forward = &forward<bf16, float>;
  k.backward = &backward<bf16, float>;
  k.matrix = Matrix::kFloat;
  return k;
}

}  // namespace
}  // namespace MYRNN_ISA

#define MYRNN_STR2(x) #x
#define MYRNN_STR(x) MYRNN_STR2(x)

const KernelTable& MYRNN_CAT(kernels_, MYRNN_ISA)() {
  static const KernelTable table{MYRNN_STR(MYRNN_ISA),          MYRNN_ISA::kernels_for<float>(),
                                 MYRNN_ISA::kernels_for<double>(), MYRNN_ISA::kernels_for<bf16>(),
                                 MYRNN_ISA::kernels_for_bf16_float(), MYRNN_ISA::kernels_for<f16>(),
                                 MYRNN_ISA::kConversions};
  return table;
}

}  // namespace myrnn_fast::cpu
