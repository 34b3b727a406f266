// cuda/rope.cu: RoPE table and rotation (semantics: RopeTableParams / RopeParams in bts/ops.h,
// Hugging Face rotate-half pairing).
//
// rope_table: inv_freq has Dh/2 entries and follows transformers' fp32 arithmetic step by step
// (including the Llama 3 band smoothing), so it is computed on the host in exactly the reference's
// operation order and copied to the device; the [P, Dh/2] cos/sin table is one thread per entry, with
// the fp32 angle pos*inv_freq and double cos/sin rounded to fp32 (as the reference; built once).
// rope_forward: one thread per rotation pair (n, h, i < Dh/2): reads x[i], x[i+Dh/2], writes both, so
// in-place (out == x with equal strides) is safe. Positions are device data and are not checked on the
// host (that would need a synchronisation per call): a row whose position is outside [0, P) is written
// as NaN instead of reading out of bounds. Legend: N rows, nh heads, Dh head dim, P table positions.
#include <cmath>
#include <vector>

#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

__global__ void rope_table_kernel(int64_t P, int64_t half, const float* inv_freq /* [Dh/2] */,
                                  float* table /* [P, Dh/2, 2] */) {
  const int64_t total = P * half;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pos = x / half, i = x % half;
    const float a = float(pos) * inv_freq[i];
    table[2 * x] = float(cos(double(a)));
    table[2 * x + 1] = float(sin(double(a)));
  }
}

__global__ void rope_kernel(int64_t N, int64_t nh, int64_t half, int64_t P, float sign, const int32_t* pos /* [N] */,
                            const float* table /* [P, Dh/2, 2] */, const float* x /* [N, nh, Dh] */, int64_t ldx,
                            float* out /* [N, nh, Dh] */, int64_t ldo) {
  const int64_t per_row = nh * half, total = N * per_row;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / per_row, r = t % per_row, h = r / half, i = r % half;
    const float* xi = x + n * ldx + h * 2 * half;
    float* oi = out + n * ldo + h * 2 * half;
    const int32_t ps = pos[n];
    if (ps < 0 || int64_t(ps) >= P) {
      oi[i] = oi[i + half] = NAN;
      continue;
    }
    const float c = table[(int64_t(ps) * half + i) * 2], s = sign * table[(int64_t(ps) * half + i) * 2 + 1];
    const float x1 = xi[i], x2 = xi[i + half];
    oi[i] = fmaf(x1, c, -x2 * s);
    oi[i + half] = fmaf(x2, c, x1 * s);
  }
}

// transformers' inv_freq in fp32, the same operations in the same order as reference/rope.cc.
std::vector<float> inv_freq_f32(const RopeTableParams& p) {
  const int64_t half = p.Dh / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  const float dim = float(p.Dh), base = float(p.theta);
  for (int64_t i = 0; i < half; i++) {
    const float e = float(2 * i) / dim;
    const float pw = float(std::pow(double(base), double(e)));
    inv[size_t(i)] = 1.0f / pw;
  }
  if (!(p.factor > 0)) return inv;
  const float factor = float(p.factor), low = float(p.low_freq_factor);
  const float band = float(p.high_freq_factor - p.low_freq_factor);
  const float old_ctx = float(p.original_max_position_embeddings);
  const double low_wavelen = p.original_max_position_embeddings / p.low_freq_factor;
  const double high_wavelen = p.original_max_position_embeddings / p.high_freq_factor;
  const float two_pi = float(2.0 * M_PI);
  for (int64_t i = 0; i < half; i++) {
    const float f = inv[size_t(i)];
    const float wavelen = (1.0f / f) * two_pi;
    if (wavelen > float(low_wavelen)) {
      inv[size_t(i)] = f / factor;
    } else if (wavelen < float(high_wavelen)) {
      inv[size_t(i)] = f;
    } else {
      const float ratio = (1.0f / wavelen) * old_ctx;
      const float smooth = (ratio - low) / band;
      volatile float a = (1.0f - smooth) * f / factor;  // no FMA contraction, as the reference
      volatile float b = smooth * f;
      inv[size_t(i)] = a + b;
    }
  }
  return inv;
}

}  // namespace

void launch_rope_table(const RopeTableParams& p, const float* inv_freq_dev, cudaStream_t s) {
  const int64_t half = p.Dh / 2;
  BTS_LAUNCH(rope_table_kernel, detail::grid_for(p.P * half, 256, 8192), 256, 0, s, p.P, half, inv_freq_dev, p.table);
}

void launch_rope_forward(const RopeParams& p, cudaStream_t s) {
  const int64_t half = p.Dh / 2, row = p.nh * p.Dh;
  BTS_LAUNCH(rope_kernel, detail::grid_for(p.N * p.nh * half, 256, 8192), 256, 0, s, p.N, p.nh, half, p.P,
             p.inverse ? -1.f : 1.f, p.pos, p.table, p.x, p.ld_x ? p.ld_x : row, p.out, p.ld_out ? p.ld_out : row);
}

void rope_table(const RopeTableParams& p, cudaStream_t stream) {
  const char* op = "rope_table";
  detail::need(p.P >= 0, op, "P must be >= 0");
  detail::need(p.Dh > 0 && p.Dh % 2 == 0, op, "Dh must be a positive even number");
  detail::need(p.theta > 0 && std::isfinite(p.theta), op, "theta must be a positive finite number");
  if (p.factor > 0)
    detail::need(p.low_freq_factor > 0 && p.high_freq_factor > p.low_freq_factor &&
                     p.original_max_position_embeddings > 0,
                 op, "llama3 scaling needs low_freq_factor > 0, high_freq_factor > low_freq_factor, original_max > 0");
  const std::vector<float> inv = inv_freq_f32(p);
  detail::Scratch scratch(p.inv_freq ? 0 : inv.size() * sizeof(float), stream);
  float* dev_inv = p.inv_freq ? p.inv_freq : scratch.as<float>();
  BTS_CUDA_CHECK(cudaMemcpyAsync(dev_inv, inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  if (p.P > 0) {
    detail::need_ptr(p.table, op, "table");
    launch_rope_table(p, dev_inv, stream);
  }
  // `inv` is pageable host memory: make sure the copy consumed it before it goes out of scope.
  BTS_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void rope_forward(const RopeParams& p, cudaStream_t stream) {
  const char* op = "rope_forward";
  detail::need(p.N >= 0 && p.nh > 0 && p.P > 0, op, "N >= 0, nh > 0 and P > 0 required");
  detail::need(p.Dh > 0 && p.Dh % 2 == 0, op, "Dh must be a positive even number");
  const int64_t row = p.nh * p.Dh;
  detail::need(p.ld_x == 0 || p.ld_x >= row, op, "ld_x must be 0 or >= nh*Dh");
  detail::need(p.ld_out == 0 || p.ld_out >= row, op, "ld_out must be 0 or >= nh*Dh");
  detail::need(!(p.out == p.x && (p.ld_x ? p.ld_x : row) != (p.ld_out ? p.ld_out : row)), op,
               "in-place out (== x) needs ld_out == ld_x");
  if (p.N == 0) return;
  detail::need_ptr(p.x, op, "x");
  detail::need_ptr(p.pos, op, "pos");
  detail::need_ptr(p.table, op, "table");
  detail::need_ptr(p.out, op, "out");
  launch_rope_forward(p, stream);
}

}  // namespace cuda
}  // namespace bts
