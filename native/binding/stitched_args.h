// stitched_args.h: the Node-API pieces the two stitched-model bindings share, native/binding/stitched.cc
// (the CPU engine, NativeStitched) and native/cuda/engine/stitched_binding.cc (the CUDA engine,
// CudaStitched): the parser of the spec object {stitches, expertStream, hubBias, gateDropout}
// (lib/engine/stitched-native.ts NativeStitchSpec). One parser, so both accept the same specs and word
// their errors the same way; the engines then validate the placement (plan_stitches, stitched.h).
//
// Known limits: header-only (inline), included inside the BTS_ONLY_OPS_BUILD guard like llama_args.h.
#pragma once
#include <napi.h>

#include <string>

#include "../engine/stitched.h"
#include "llama_args.h"

namespace bts {
namespace napi {

// The spec object `v` for `who` (e.g. "stitchedCreate") over L blocks; E_ARGUMENT naming the field.
inline bts::engine::StitchSpec parse_stitch_spec(Napi::Env env, const Napi::Value& v, int64_t L, const std::string& who) {
  if (!v.IsObject() || v.IsArray())
    throw make_error(env, "E_ARGUMENT", who + ": spec must be an object {stitches, expertStream, hubBias, gateDropout}, got " + describe(v));
  Napi::Object so = v.As<Napi::Object>();
  bts::engine::StitchSpec spec;
  Napi::Value sv = so.Get("stitches");
  if (!sv.IsArray()) throw make_error(env, "E_ARGUMENT", who + ": spec.stitches must be an array, got " + describe(sv));
  Napi::Array sa = sv.As<Napi::Array>();
  for (uint32_t k = 0; k < sa.Length(); k++) {
    const std::string where = who + ": spec.stitches[" + std::to_string(k) + "]";
    Napi::Value e = sa.Get(k);
    if (!e.IsObject()) throw make_error(env, "E_ARGUMENT", where + " must be an object {afterBlock, type}, got " + describe(e));
    Napi::Object eo = e.As<Napi::Object>();
    bts::engine::StitchPoint p;
    p.after_block = int_arg(env, eo.Get("afterBlock"), where + ".afterBlock", 1, L);
    Napi::Value ty = eo.Get("type");
    const std::string ts = ty.IsString() ? ty.As<Napi::String>().Utf8Value() : "";
    if (ts == "eh") p.type = bts::engine::StitchType::EH;
    else if (ts == "he") p.type = bts::engine::StitchType::HE;
    else throw make_error(env, "E_ARGUMENT", where + ".type must be 'eh' or 'he', got " + describe(ty));
    spec.stitches.push_back(p);
  }
  Napi::Value es = so.Get("expertStream");
  const std::string ess = es.IsString() ? es.As<Napi::String>().Utf8Value() : "";
  if (ess != "projected" && ess != "unchanged")
    throw make_error(env, "E_ARGUMENT", who + ": spec.expertStream must be 'projected' or 'unchanged', got " + describe(es));
  spec.projected = ess == "projected";
  spec.hub_bias = float(num_arg(env, so.Get("hubBias"), who + ": spec.hubBias"));
  spec.gate_dropout = float(num_arg(env, so.Get("gateDropout"), who + ": spec.gateDropout"));
  if (spec.stitches.empty()) throw make_error(env, "E_ARGUMENT", who + ": spec.stitches must hold at least one stitch");
  return spec;
}

}  // namespace napi
}  // namespace bts
