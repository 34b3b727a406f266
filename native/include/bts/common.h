// common.h: shared definitions of the branch-train-stitch native core.
//
// Everything under native/ except native/binding/ is plain C++17 with no Node-API dependency, so the
// same sources build the Node addon, the standalone native tests and the benchmarks.
//
// Shape legend used in every native file (see docs/ARCHITECTURE.md, "Layout conventions"):
//   B batch, T tokens per sequence, N = B*T rows, D model width, H query heads, Hkv key/value heads,
//   Dh head dim, F ffn width, V vocab, M (or n+1) models in a stitch, K/M/N in GEMM as in BLAS.
// All tensors are row-major and contiguous unless a stride ("ld") says otherwise; the last dim is the
// fastest. Linear weights are [out, in] as in Hugging Face (y = x W^T).
// Gradient convention: gradients of weights (dw) are ACCUMULATED (+=), so micro-batches can add up;
// gradients of activations (dx) are OVERWRITTEN, unless an op says otherwise.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace bts {

// Thrown by op entry points on invalid arguments. `code` is a stable identifier that the TypeScript
// layer maps to a typed error class (see lib/errors.ts).
struct Error : std::runtime_error {
  std::string code;
  Error(std::string code_, const std::string& msg) : std::runtime_error(msg), code(std::move(code_)) {}
};

// Throws bts::Error(code, message). Defined out of line (native/core/error.cc) so that kernel code
// compiled for an ISA level never instantiates std::string or bts::Error's members itself (see
// native/cpu/simd.h, "Scratch arrays").
[[noreturn]] void throw_error(const char* code, const char* message);

// bf16 is stored as the upper 16 bits of an IEEE fp32 (same as torch.bfloat16).
using bf16 = uint16_t;

inline float bf16_to_f32(bf16 h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, NaN kept quiet (matches torch's float -> bfloat16 conversion).
inline bf16 f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

}  // namespace bts
