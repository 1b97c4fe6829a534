// Portable definitions for kernel code that compiles three ways: by nvcc (inside the extension),
// by NVRTC at run time (through CuPy), and by the host C++ compiler (the CPU kernels).
// No torch or CUDA headers here: kernels take pointers, sizes and strides.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FASTMOE_HD __host__ __device__ inline
#else
#define FASTMOE_HD inline
#endif

#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <cstring>
#endif

namespace fastmoe {

typedef int i32;
typedef long long i64;
typedef unsigned short u16;
typedef unsigned int u32;

// 16-bit floats as raw bits, converted by hand: no dependence on cuda_fp16.h or c10::Half, and the
// host and device agree bit for bit (round to nearest even).
struct half_t {
  u16 bits;
};
struct bf16_t {
  u16 bits;
};

FASTMOE_HD float bits_to_float(u32 u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FASTMOE_HD u32 float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  u32 u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FASTMOE_HD float neg_inf() { return bits_to_float(0xff800000u); }

FASTMOE_HD float to_float(float x) { return x; }
FASTMOE_HD float to_float(bf16_t x) { return bits_to_float(u32(x.bits) << 16); }
FASTMOE_HD float to_float(half_t x) {
  const u32 h = x.bits;
  const u32 sign = (h & 0x8000u) << 16;
  const u32 exponent = (h >> 10) & 0x1fu;
  const u32 mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24
    const float v = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

template <typename T>
FASTMOE_HD T from_float(float f);

template <>
FASTMOE_HD float from_float<float>(float f) {
  return f;
}

template <>
FASTMOE_HD bf16_t from_float<bf16_t>(float f) {
  u32 u = float_to_bits(f);
  bf16_t out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    out.bits = u16((u >> 16) | 0x40u);
    return out;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out.bits = u16(u >> 16);
  return out;
}

template <>
FASTMOE_HD half_t from_float<half_t>(float f) {
  const u32 u = float_to_bits(f);
  const u32 sign = (u >> 16) & 0x8000u;
  const u32 magnitude = u & 0x7fffffffu;
  half_t out;
  if (magnitude > 0x7f800000u) {
    out.bits = u16(sign | 0x7e00u);
  } else if (magnitude >= 0x477ff000u) {  // >= 65520 rounds to infinity
    out.bits = u16(sign | 0x7c00u);
  } else if (magnitude < 0x38800000u) {  // below 2^-14: subnormal half, mantissa = round(v · 2^24)
    out.bits = u16(sign | u32(rintf(bits_to_float(magnitude) * 16777216.0f)));
  } else {
    const u32 rebiased = magnitude - 0x38000000u;
    out.bits = u16(sign | ((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13));
  }
  return out;
}

FASTMOE_HD float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

}  // namespace fastmoe
