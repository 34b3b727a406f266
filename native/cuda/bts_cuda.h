// bts_cuda.h: the CUDA backend's op entries. One op, one name, one params struct across backends: each
// function here takes the params struct of native/include/bts/ops.h with DEVICE pointers and queues the
// work on `stream` (no host synchronisation, except where noted). It checks what the params can tell
// and throws bts::Error (E_ARGUMENT / E_SHAPE / E_TOKEN_RANGE, or E_CUDA for a failed CUDA call, with
// file and line). Plain C++ header: usable from host code compiled by g++ (the future bts_cuda.node
// binding) without the CUDA headers.
//
// Under the SIMT emulator (BTS_CUDA_EMULATOR, native/emu) the same entries run the kernels on the CPU
// and every call is synchronous.
#pragma once
#include <cstdint>

#include "bts/ops.h"

#if !defined(__CUDACC__) && !defined(BTS_CUDA_EMULATOR)
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;  // exactly as in the CUDA runtime's driver_types.h
#endif

namespace bts {
namespace cuda {

// GEMM. gemm_f32: fp32 tiled in shared memory, or (math == Bf16TensorCore) A and B rounded to bf16 and
// multiplied on tensor cores (WMMA, fp32 accumulation): faster, ~3 significant digits.
enum class GemmMath { Fp32 = 0, Bf16TensorCore = 1 };
void gemm_f32(const GemmParams& p, cudaStream_t stream, GemmMath math = GemmMath::Fp32);
// bf16 weights: always the tensor-core path (A rounded to bf16, fp32 accumulation).
void gemm_bf16(const GemmBf16Params& p, cudaStream_t stream);

void attention_forward(const AttentionParams& p, cudaStream_t stream);
void attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);

void rmsnorm_forward(const RmsNormParams& p, cudaStream_t stream);
void rmsnorm_backward(const RmsNormBackwardParams& p, cudaStream_t stream);

void rope_table(const RopeTableParams& p, cudaStream_t stream);
void rope_forward(const RopeParams& p, cudaStream_t stream);

void swiglu_forward(const SwigluParams& p, cudaStream_t stream);
void swiglu_backward(const SwigluBackwardParams& p, cudaStream_t stream);

// Both synchronise the stream to report an out-of-range id as E_TOKEN_RANGE (naming the first).
void embedding_forward(const EmbeddingParams& p, cudaStream_t stream);
void embedding_backward(const EmbeddingBackwardParams& p, cudaStream_t stream);

// Synchronises the stream once, to report an out-of-range target as E_TOKEN_RANGE.
void cross_entropy_forward_backward(const CrossEntropyParams& p, cudaStream_t stream);
// Test hook: > 0 forces the vocabulary chunk of cross_entropy_forward_backward (0: automatic).
extern int64_t cross_entropy_vocab_chunk_for_tests;

void adamw_step(const AdamWParams& p, cudaStream_t stream);

void stitch_eh_forward(const StitchEHParams& p, cudaStream_t stream);
void stitch_eh_backward(const StitchEHBackwardParams& p, cudaStream_t stream);
void stitch_he_forward(const StitchHEParams& p, cudaStream_t stream);
void stitch_he_backward(const StitchHEBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bts
