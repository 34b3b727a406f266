// op_args.h: the argument parsers of the registry's ops, shared by every backend that is called by
// name (the CPU addon through bts::call_op, the CUDA addon native/cuda/binding.cc).
//
// parse_<op>(def, call) reads the call's scalars, checks every buffer's length against the shape they
// imply (E_SHAPE / E_ARGUMENT naming the argument, the expected and the actual value) and returns the
// op's params struct (bts/ops.h) holding the call's data pointers. It never dereferences a buffer, so
// the same parser fills a params struct with host pointers (the CPU entries) or with device pointers
// (the CUDA entries, after the binding copied the host arrays to the device). The names are those of
// the registry (bts/registry.h); dtypes and argument counts are checked before, by bts::check_call.
// Defined in native/ops/<op>.cc beside the op's CPU entry and registry spec.
#pragma once
#include "bts/ops.h"
#include "bts/registry.h"

namespace bts {

GemmParams parse_gemm_f32(const OpDef& def, OpCall& c);
GemmBf16Params parse_gemm_bf16(const OpDef& def, OpCall& c);

AttentionParams parse_attention_forward(const OpDef& def, OpCall& c);
AttentionBackwardParams parse_attention_backward(const OpDef& def, OpCall& c);

RmsNormParams parse_rmsnorm_forward(const OpDef& def, OpCall& c);
RmsNormBackwardParams parse_rmsnorm_backward(const OpDef& def, OpCall& c);

RopeTableParams parse_rope_table(const OpDef& def, OpCall& c);
RopeParams parse_rope_forward(const OpDef& def, OpCall& c);
// Every position of p.pos (HOST memory) in [0, P), else E_ARGUMENT naming 'pos', the index and value.
void check_rope_positions(const RopeParams& p);

SwigluParams parse_swiglu_forward(const OpDef& def, OpCall& c);
SwigluBackwardParams parse_swiglu_backward(const OpDef& def, OpCall& c);

EmbeddingParams parse_embedding_forward(const OpDef& def, OpCall& c);
EmbeddingBackwardParams parse_embedding_backward(const OpDef& def, OpCall& c);

CrossEntropyParams parse_cross_entropy(const OpDef& def, OpCall& c);

AdamWParams parse_adamw_step(const OpDef& def, OpCall& c);

StitchEHParams parse_stitch_eh_forward(const OpDef& def, OpCall& c);
StitchEHBackwardParams parse_stitch_eh_backward(const OpDef& def, OpCall& c);
StitchHEParams parse_stitch_he_forward(const OpDef& def, OpCall& c);
StitchHEBackwardParams parse_stitch_he_backward(const OpDef& def, OpCall& c);

}  // namespace bts
