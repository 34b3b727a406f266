// cuda/embedding.cu: embedding lookup and its backward (semantics: EmbeddingParams in bts/ops.h).
//
// Ids are validated on the device first (the first bad position via atomicMin, an integer: exact),
// then the stream is synchronised once and E_TOKEN_RANGE is thrown like the CPU op, before anything is
// written. Forward: one block per row, coalesced copy. Backward: dtable[ids[n]] += dout[n] must be
// deterministic, so it is an owner-computes scan with no float atomics: block (x, y) owns columns
// [32*8*x, ...) and the vocabulary rows v with v % gridDim.y == y; each thread walks n = 0..N-1 in order
// and adds the rows it owns (the same order as the reference: bit-identical). Known limit: each block
// reads all N ids; for very large N a sort-by-id (segmented) reduction would scale better.
// Legend: N rows, V vocab, D width.
#include <climits>

#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

__global__ void check_ids_kernel(int64_t N, int64_t V, const int32_t* ids /* [N] */, int* first_bad /* [1] */) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x)
    if (ids[n] < 0 || int64_t(ids[n]) >= V) atomicMin(first_bad, int(n));
}

__global__ void embedding_forward_kernel(int64_t D, const int32_t* ids /* [N] */, const float* table /* [V, D] */,
                                         float* out /* [N, D] */) {
  const int64_t n = blockIdx.x;
  const float* row = table + int64_t(ids[n]) * D;
  float* o = out + n * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = row[d];
}

__global__ void embedding_backward_kernel(int64_t N, int64_t D, const int32_t* ids /* [N] */,
                                          const float* dout /* [N, D] */, float* dtable /* [V, D] */) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;  // no barrier in this kernel
  const unsigned owners = gridDim.y, mine = blockIdx.y;
  for (int64_t n = 0; n < N; n++) {
    const int32_t v = ids[n];
    if (unsigned(v) % owners == mine) dtable[int64_t(v) * D + d] += dout[n * D + d];
  }
}

// Throws E_TOKEN_RANGE naming the first bad id (one stream synchronisation).
void check_ids(const char* op, const int32_t* ids, int64_t N, int64_t V, cudaStream_t s) {
  detail::Scratch bad(sizeof(int), s);
  BTS_CUDA_CHECK(cudaMemsetAsync(bad.p, 0x7f, sizeof(int), s));  // 0x7f7f7f7f: "none"
  BTS_LAUNCH(check_ids_kernel, detail::grid_for(N, 256, 1024), 256, 0, s, N, V, ids, bad.as<int>());
  const int first = detail::read_device_int(bad.as<int>(), s);
  if (first != 0x7f7f7f7f) {
    int32_t value = 0;
    BTS_CUDA_CHECK(cudaMemcpyAsync(&value, ids + first, sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    BTS_CUDA_CHECK(cudaStreamSynchronize(s));
    throw Error("E_TOKEN_RANGE", std::string("cuda::") + op + ": argument 'ids' at position " + std::to_string(first) +
                                     " is " + std::to_string(value) + ", outside [0, V) with V = " + std::to_string(V));
  }
}

}  // namespace

void launch_embedding_forward(const EmbeddingParams& p, cudaStream_t s) {
  const int threads = int(p.D >= 256 ? 256 : (p.D + 31) / 32 * 32);
  BTS_LAUNCH(embedding_forward_kernel, dim3(unsigned(p.N)), threads, 0, s, p.D, p.ids, p.table, p.out);
}

void launch_embedding_backward(const EmbeddingBackwardParams& p, cudaStream_t s) {
  const int threads = int(p.D >= 256 ? 256 : (p.D + 31) / 32 * 32);
  const int64_t col_blocks = detail::ceil_div(p.D, threads);
  // Enough owner slices to occupy a GPU (~128+ blocks), never more than V.
  int64_t owners = detail::ceil_div(256, col_blocks);
  if (owners > 64) owners = 64;
  if (owners > p.V) owners = p.V;
  if (owners < 1) owners = 1;
  BTS_LAUNCH(embedding_backward_kernel, dim3(unsigned(col_blocks), unsigned(owners)), threads, 0, s, p.N, p.D, p.ids,
             p.dout, p.dtable);
}

void embedding_forward(const EmbeddingParams& p, cudaStream_t stream) {
  const char* op = "embedding_forward";
  detail::need(p.N >= 0 && p.V > 0 && p.D > 0, op, "N >= 0, V > 0 and D > 0 required");
  detail::need(p.N <= 0x7fffffff && p.V <= 0x7fffffff, op, "N and V must be < 2^31");
  if (p.N == 0) return;
  detail::need_ptr(p.ids, op, "ids");
  detail::need_ptr(p.table, op, "table");
  detail::need_ptr(p.out, op, "out");
  check_ids(op, p.ids, p.N, p.V, stream);
  launch_embedding_forward(p, stream);
}

void embedding_backward(const EmbeddingBackwardParams& p, cudaStream_t stream) {
  const char* op = "embedding_backward";
  detail::need(p.N >= 0 && p.V > 0 && p.D > 0, op, "N >= 0, V > 0 and D > 0 required");
  detail::need(p.N <= 0x7fffffff && p.V <= 0x7fffffff, op, "N and V must be < 2^31");
  if (p.N == 0) return;
  detail::need_ptr(p.ids, op, "ids");
  detail::need_ptr(p.dout, op, "dout");
  detail::need_ptr(p.dtable, op, "dtable");
  check_ids(op, p.ids, p.N, p.V, stream);
  launch_embedding_backward(p, stream);
}

}  // namespace cuda
}  // namespace bts
