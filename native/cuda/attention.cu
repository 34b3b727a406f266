// cuda/attention.cu: causal GQA attention, forward and backward, flash style (semantics:
// AttentionParams / AttentionBackwardParams in bts/ops.h: query i of Tq sits at position Tk - Tq + i of
// a K/V cache of capacity Tcap and sees keys 0 ..= Tk - Tq + i; head h uses kv head h / (H / Hkv)).
//
// Layout of the work: a block is 8 warps; a warp owns one row (a query row in the forward and in the
// dq pass, a key row in the dk/dv pass). The other side is streamed through shared memory in tiles of
// 32 rows, one per lane: lane j computes the score of tile row j (a dot product over Dh against the
// warp's own row, read as a broadcast; tile rows are padded to Dh + 1 floats so the 32 lanes hit 32
// banks), the softmax statistics are warp reductions, and the weighted sums over the tile's 32 rows are
// accumulated with each lane owning head-dim elements d = lane + 32 e (Dh / 32 registers, templated:
// Dh <= 32, 64, 128, 256). So nothing larger than one [32, Dh] tile is ever materialised, the K/V tile
// is reused by the block's 8 query rows, every global load is a contiguous Dh-float row, and no score
// matrix touches global memory.
//  - forward: online softmax (running max m and sum l per row, rescaling the accumulator), lse = m +
//    log l per row for the backward.
//  - backward: (1) delta_i = dout_i . out_i; (2) dq_i = scale sum_j dS_ij k_j, query-major like the
//    forward; (3) dk_j = scale sum_i dS_ij q_i and dv_j = sum_i P_ij dout_i, key-major over the query
//    heads of the kv group and the query tiles at or after the key. With P_ij = exp(scale q_i.k_j -
//    lse_i) and dS_ij = P_ij (dout_i.v_j - delta_i). Every output element has a single owner thread
//    that sums in a fixed order: no atomics, deterministic (unlike the usual atomicAdd dq of
//    FlashAttention-2, at the price of recomputing the scores twice).
// Known limits: CUDA cores only (no tensor-core MMA for QK^T / PV yet); Dh <= 256; one query head per
// block (GQA heads sharing a K/V tile are not batched into one block).
// Legend: B batch, Tq/Tk/T tokens, Tcap cache capacity, H heads, Hkv kv heads, Dh head dim.
#include <cmath>

#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // rows per block
constexpr int kTile = 32;  // rows per streamed tile (one per lane)

// ---------------------------------------------------------------------------------------------------
template <int DPL>
__global__ void __launch_bounds__(256)
    attention_forward_kernel(int64_t Tq, int64_t Tk, int64_t Tcap, int64_t H, int64_t Hkv, int Dh, float scale,
                             const float* q /* [B, Tq, H, Dh] */, const float* k /* [B, Tcap, Hkv, Dh] */,
                             const float* v /* [B, Tcap, Hkv, Dh] */, float* out /* [B, Tq, H, Dh] */,
                             float* lse /* [B, H, Tq] or null */) {
  BTS_DYNAMIC_SHARED(float, smem);
  const int ldk = Dh + 1;
  auto Ks = smem;                      // [32][Dh + 1]
  auto Vs = Ks + kTile * ldk;          // [32][Dh + 1]
  auto Qs = Vs + kTile * ldk;          // [8][Dh]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (H / Hkv);
  const int64_t i0 = int64_t(blockIdx.x) * kWarps, i = i0 + warp;
  const bool valid = i < Tq;
  const int64_t row = valid ? i : Tq - 1;
  const int64_t last = Tk - Tq + row;                                   // last key this row sees
  const int64_t last_block = Tk - Tq + min64(i0 + kWarps - 1, Tq - 1);  // last key any row of the block sees
  const float* qr = q + ((b * Tq + row) * H + h) * Dh;
  for (int d = lane; d < Dh; d += 32) Qs[warp * Dh + d] = qr[d];

  float m = -INFINITY, l = 0.f, o[DPL];
#pragma unroll
  for (int e = 0; e < DPL; e++) o[e] = 0.f;

  for (int64_t j0 = 0; j0 <= last_block; j0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    for (int r = warp; r < kTile; r += kWarps) {
      const int64_t j = j0 + r;
      const bool in = j <= last_block;
      const float* kr = k + ((b * Tcap + j) * Hkv + hk) * Dh;
      const float* vr = v + ((b * Tcap + j) * Hkv + hk) * Dh;
      for (int d = lane; d < Dh; d += 32) {
        Ks[r * ldk + d] = in ? kr[d] : 0.f;
        Vs[r * ldk + d] = in ? vr[d] : 0.f;
      }
    }
    __syncthreads();
    const int64_t j = j0 + lane;
    float s = -INFINITY;
    if (j <= last) {
      float dot = 0.f;
      for (int d = 0; d < Dh; d++) dot = fmaf(Qs[warp * Dh + d], Ks[lane * ldk + d], dot);
      s = dot * scale;
    }
    const float m_new = fmaxf(m, warp_max(s));  // finite: key 0 is in the first tile of every row
    const float p = j <= last ? expf(s - m_new) : 0.f;
    const float corr = expf(m - m_new);
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int e = 0; e < DPL; e++) o[e] *= corr;
    const int jn = int(min64(kTile, last_block - j0 + 1));
    for (int jj = 0; jj < jn; jj++) {
      const float pj = __shfl_sync(kFullMask, p, jj);
#pragma unroll
      for (int e = 0; e < DPL; e++) {
        const int d = lane + 32 * e;
        if (d < Dh) o[e] = fmaf(pj, Vs[jj * ldk + d], o[e]);
      }
    }
    m = m_new;
  }
  if (valid) {
    float* orow = out + ((b * Tq + i) * H + h) * Dh;
    const float inv = 1.f / l;
#pragma unroll
    for (int e = 0; e < DPL; e++) {
      const int d = lane + 32 * e;
      if (d < Dh) orow[d] = o[e] * inv;
    }
    if (lse && lane == 0) lse[(b * H + h) * Tq + i] = m + logf(l);
  }
}

// ---------------------------------------------------------------------------------------------------
// delta[b, h, i] = dout_i . out_i, one warp per row.
__global__ void attention_delta_kernel(int64_t B, int64_t T, int64_t H, int Dh, const float* out /* [B, T, H, Dh] */,
                                       const float* dout /* [B, T, H, Dh] */, float* delta /* [B, H, T] */) {
  const int64_t rows = B * T * H;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int lane = threadIdx.x % 32;
    float acc = 0.f;
    for (int d = lane; d < Dh; d += 32) acc = fmaf(out[r * Dh + d], dout[r * Dh + d], acc);
    acc = warp_sum(acc);
    const int64_t h = r % H, i = (r / H) % T, b = r / (H * T);
    if (lane == 0) delta[(b * H + h) * T + i] = acc;
  }
}

// dq, query-major: grid (ceil(T / 8), H, B).
template <int DPL>
__global__ void __launch_bounds__(256)
    attention_dq_kernel(int64_t T, int64_t H, int64_t Hkv, int Dh, float scale, const float* q /* [B, T, H, Dh] */,
                        const float* k /* [B, T, Hkv, Dh] */, const float* v /* [B, T, Hkv, Dh] */,
                        const float* lse /* [B, H, T] */, const float* delta /* [B, H, T] */,
                        const float* dout /* [B, T, H, Dh] */, float* dq /* [B, T, H, Dh] */) {
  BTS_DYNAMIC_SHARED(float, smem);
  const int ldk = Dh + 1;
  auto Ks = smem;               // [32][Dh + 1]
  auto Vs = Ks + kTile * ldk;   // [32][Dh + 1]
  auto Qs = Vs + kTile * ldk;   // [8][Dh]
  auto Gs = Qs + kWarps * Dh;   // [8][Dh] dout rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (H / Hkv);
  const int64_t i0 = int64_t(blockIdx.x) * kWarps, i = i0 + warp;
  const bool valid = i < T;
  const int64_t row = valid ? i : T - 1;
  const int64_t last_block = min64(i0 + kWarps - 1, T - 1);
  const int64_t qoff = ((b * T + row) * H + h) * Dh;
  for (int d = lane; d < Dh; d += 32) {
    Qs[warp * Dh + d] = q[qoff + d];
    Gs[warp * Dh + d] = dout[qoff + d];
  }
  const float lse_i = lse[(b * H + h) * T + row], delta_i = delta[(b * H + h) * T + row];
  float acc[DPL];
#pragma unroll
  for (int e = 0; e < DPL; e++) acc[e] = 0.f;

  for (int64_t j0 = 0; j0 <= last_block; j0 += kTile) {
    __syncthreads();
    for (int r = warp; r < kTile; r += kWarps) {
      const int64_t j = j0 + r;
      const bool in = j <= last_block;
      const float* kr = k + ((b * T + j) * Hkv + hk) * Dh;
      const float* vr = v + ((b * T + j) * Hkv + hk) * Dh;
      for (int d = lane; d < Dh; d += 32) {
        Ks[r * ldk + d] = in ? kr[d] : 0.f;
        Vs[r * ldk + d] = in ? vr[d] : 0.f;
      }
    }
    __syncthreads();
    const int64_t j = j0 + lane;
    float ds = 0.f;
    if (j <= row) {
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < Dh; d++) {
        s = fmaf(Qs[warp * Dh + d], Ks[lane * ldk + d], s);
        dp = fmaf(Gs[warp * Dh + d], Vs[lane * ldk + d], dp);
      }
      const float P = expf(s * scale - lse_i);
      ds = P * (dp - delta_i);
    }
    const int jn = int(min64(kTile, last_block - j0 + 1));
    for (int jj = 0; jj < jn; jj++) {
      const float dsj = __shfl_sync(kFullMask, ds, jj);
#pragma unroll
      for (int e = 0; e < DPL; e++) {
        const int d = lane + 32 * e;
        if (d < Dh) acc[e] = fmaf(dsj, Ks[jj * ldk + d], acc[e]);
      }
    }
  }
  if (valid) {
#pragma unroll
    for (int e = 0; e < DPL; e++) {
      const int d = lane + 32 * e;
      if (d < Dh) dq[qoff + d] = acc[e] * scale;
    }
  }
}

// dk, dv, key-major: grid (ceil(T / 8), Hkv, B); loops over the G = H / Hkv query heads of the group.
template <int DPL>
__global__ void __launch_bounds__(256)
    attention_dkdv_kernel(int64_t T, int64_t H, int64_t Hkv, int Dh, float scale, const float* q /* [B, T, H, Dh] */,
                          const float* k /* [B, T, Hkv, Dh] */, const float* v /* [B, T, Hkv, Dh] */,
                          const float* lse /* [B, H, T] */, const float* delta /* [B, H, T] */,
                          const float* dout /* [B, T, H, Dh] */, float* dk /* [B, T, Hkv, Dh] */,
                          float* dv /* [B, T, Hkv, Dh] */) {
  BTS_DYNAMIC_SHARED(float, smem);
  const int ldq = Dh + 1;
  auto Qs = smem;                 // [32][Dh + 1] query rows of the tile
  auto Gs = Qs + kTile * ldq;     // [32][Dh + 1] dout rows of the tile
  auto Kw = Gs + kTile * ldq;     // [8][Dh] the warps' key rows
  auto Vw = Kw + kWarps * Dh;     // [8][Dh] the warps' value rows
  auto Ls = Vw + kWarps * Dh;     // [32] lse of the tile's rows
  auto Ds = Ls + kTile;           // [32] delta of the tile's rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, hk = blockIdx.y, G = H / Hkv;
  const int64_t j0 = int64_t(blockIdx.x) * kWarps, j = j0 + warp;
  const bool valid = j < T;
  const int64_t key = valid ? j : T - 1;
  const int64_t koff = ((b * T + key) * Hkv + hk) * Dh;
  for (int d = lane; d < Dh; d += 32) {
    Kw[warp * Dh + d] = k[koff + d];
    Vw[warp * Dh + d] = v[koff + d];
  }
  float adk[DPL], adv[DPL];
#pragma unroll
  for (int e = 0; e < DPL; e++) adk[e] = adv[e] = 0.f;

  for (int64_t g = 0; g < G; g++) {
    const int64_t h = hk * G + g;
    for (int64_t t0 = (j0 / kTile) * kTile; t0 < T; t0 += kTile) {
      __syncthreads();
      for (int r = warp; r < kTile; r += kWarps) {
        const int64_t i = t0 + r;
        const bool in = i < T;
        const float* qr = q + ((b * T + i) * H + h) * Dh;
        const float* gr = dout + ((b * T + i) * H + h) * Dh;
        for (int d = lane; d < Dh; d += 32) {
          Qs[r * ldq + d] = in ? qr[d] : 0.f;
          Gs[r * ldq + d] = in ? gr[d] : 0.f;
        }
      }
      if (threadIdx.x < kTile) {
        const int64_t i = t0 + threadIdx.x;
        Ls[threadIdx.x] = i < T ? lse[(b * H + h) * T + i] : 0.f;
        Ds[threadIdx.x] = i < T ? delta[(b * H + h) * T + i] : 0.f;
      }
      __syncthreads();
      const int64_t i = t0 + lane;
      float P = 0.f, ds = 0.f;
      if (i < T && i >= key) {
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < Dh; d++) {
          s = fmaf(Qs[lane * ldq + d], Kw[warp * Dh + d], s);
          dp = fmaf(Gs[lane * ldq + d], Vw[warp * Dh + d], dp);
        }
        const float lse_i = Ls[lane], delta_i = Ds[lane];
        P = expf(s * scale - lse_i);
        ds = P * (dp - delta_i);
      }
      for (int ii = 0; ii < kTile; ii++) {
        const float Pi = __shfl_sync(kFullMask, P, ii), dsi = __shfl_sync(kFullMask, ds, ii);
#pragma unroll
        for (int e = 0; e < DPL; e++) {
          const int d = lane + 32 * e;
          if (d < Dh) {
            adv[e] = fmaf(Pi, Gs[ii * ldq + d], adv[e]);
            adk[e] = fmaf(dsi, Qs[ii * ldq + d], adk[e]);
          }
        }
      }
    }
  }
  if (valid) {
#pragma unroll
    for (int e = 0; e < DPL; e++) {
      const int d = lane + 32 * e;
      if (d < Dh) {
        dk[koff + d] = adk[e] * scale;
        dv[koff + d] = adv[e];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
template <class F>
void allow_smem(F* kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    BTS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <int DPL>
void launch_forward_t(const AttentionParams& p, cudaStream_t s) {
  const int Dh = int(p.Dh);
  const size_t bytes = sizeof(float) * size_t(2 * kTile * (Dh + 1) + kWarps * Dh);
  auto attention_fwd = attention_forward_kernel<DPL>;
  allow_smem(attention_fwd, bytes);
  const dim3 grid(unsigned(detail::ceil_div(p.Tq, kWarps)), unsigned(p.H), unsigned(p.B));
  BTS_LAUNCH(attention_fwd, grid, 32 * kWarps, bytes, s, p.Tq, p.Tk, p.Tcap, p.H, p.Hkv, Dh, p.scale, p.q, p.k, p.v,
             p.out, p.lse);
}

template <int DPL>
void launch_backward_t(const AttentionBackwardParams& p, float* delta, cudaStream_t s) {
  const int Dh = int(p.Dh);
  BTS_LAUNCH(attention_delta_kernel, detail::grid_for(p.B * p.T * p.H, kWarps, 8192), 32 * kWarps, 0, s, p.B, p.T,
             p.H, Dh, p.out, p.dout, delta);
  const size_t dq_bytes = sizeof(float) * size_t(2 * kTile * (Dh + 1) + 2 * kWarps * Dh);
  auto attention_dq = attention_dq_kernel<DPL>;
  allow_smem(attention_dq, dq_bytes);
  BTS_LAUNCH(attention_dq, dim3(unsigned(detail::ceil_div(p.T, kWarps)), unsigned(p.H), unsigned(p.B)), 32 * kWarps,
             dq_bytes, s, p.T, p.H, p.Hkv, Dh, p.scale, p.q, p.k, p.v, p.lse, delta, p.dout, p.dq);
  const size_t kv_bytes = sizeof(float) * size_t(2 * kTile * (Dh + 1) + 2 * kWarps * Dh + 2 * kTile);
  auto attention_dkdv = attention_dkdv_kernel<DPL>;
  allow_smem(attention_dkdv, kv_bytes);
  BTS_LAUNCH(attention_dkdv, dim3(unsigned(detail::ceil_div(p.T, kWarps)), unsigned(p.Hkv), unsigned(p.B)),
             32 * kWarps, kv_bytes, s, p.T, p.H, p.Hkv, Dh, p.scale, p.q, p.k, p.v, p.lse, delta, p.dout, p.dk, p.dv);
}

void check_heads(const char* op, int64_t B, int64_t H, int64_t Hkv, int64_t Dh) {
  detail::need(B >= 0, op, "B must be >= 0");
  detail::need(H > 0 && Hkv > 0 && H % Hkv == 0, op, "H and Hkv must be > 0 with H a multiple of Hkv");
  detail::need(Dh > 0, op, "Dh must be > 0");
  if (Dh > 256) detail::shape_error(op, "Dh must be <= 256 on CUDA, got " + std::to_string(Dh));
  detail::need(B <= 65535 && H <= 65535, op, "B and H must be <= 65535 (grid dimensions)");
}

}  // namespace

void launch_attention_forward(const AttentionParams& p, cudaStream_t s) {
  if (p.Dh <= 32) launch_forward_t<1>(p, s);
  else if (p.Dh <= 64) launch_forward_t<2>(p, s);
  else if (p.Dh <= 128) launch_forward_t<4>(p, s);
  else launch_forward_t<8>(p, s);
}

void launch_attention_backward(const AttentionBackwardParams& p, float* delta /* [B, H, T] scratch */,
                               cudaStream_t s) {
  if (p.Dh <= 32) launch_backward_t<1>(p, delta, s);
  else if (p.Dh <= 64) launch_backward_t<2>(p, delta, s);
  else if (p.Dh <= 128) launch_backward_t<4>(p, delta, s);
  else launch_backward_t<8>(p, delta, s);
}

void attention_forward(const AttentionParams& p, cudaStream_t stream) {
  const char* op = "attention_forward";
  check_heads(op, p.B, p.H, p.Hkv, p.Dh);
  detail::need(p.Tq >= 0 && p.Tq <= p.Tk && p.Tk <= p.Tcap, op, "0 <= Tq <= Tk <= Tcap required");
  detail::need(p.scale == p.scale && std::isfinite(p.scale), op, "scale must be finite");
  if (p.B == 0 || p.Tq == 0) return;
  detail::need_ptr(p.q, op, "q");
  detail::need_ptr(p.k, op, "k");
  detail::need_ptr(p.v, op, "v");
  detail::need_ptr(p.out, op, "out");
  launch_attention_forward(p, stream);
}

void attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  const char* op = "attention_backward";
  check_heads(op, p.B, p.H, p.Hkv, p.Dh);
  detail::need(p.T >= 0, op, "T must be >= 0");
  detail::need(std::isfinite(p.scale), op, "scale must be finite");
  if (p.B == 0 || p.T == 0) return;
  detail::need_ptr(p.q, op, "q");
  detail::need_ptr(p.k, op, "k");
  detail::need_ptr(p.v, op, "v");
  detail::need_ptr(p.out, op, "out");
  detail::need_ptr(p.lse, op, "lse");
  detail::need_ptr(p.dout, op, "dout");
  detail::need_ptr(p.dq, op, "dq");
  detail::need_ptr(p.dk, op, "dk");
  detail::need_ptr(p.dv, op, "dv");
  detail::Scratch delta(sizeof(float) * size_t(p.B * p.H * p.T), stream);
  launch_attention_backward(p, delta.as<float>(), stream);
}

}  // namespace cuda
}  // namespace bts
