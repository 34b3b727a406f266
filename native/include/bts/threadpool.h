// threadpool.h: the one compute thread pool of the process.
//
// Design (see docs/ARCHITECTURE.md, "Threads"):
// - n compute threads in all: the thread that calls an op (the JS thread for sync calls, a libuv worker
//   for async ones) is thread 0, and n-1 persistent workers are the others. Default n = number of
//   cores; BTS_THREADS or set_num_threads() changes it.
// - Ops run one at a time: every op entry takes the compute lock (ComputeLock), so several AsyncWorkers
//   queued from JS never run their kernels side by side and never oversubscribe the cores. The other
//   libuv threads simply wait on the lock, asleep.
// - After a job the workers spin for a short while (BTS_SPIN_US, default 300 us) before sleeping, so a
//   stream of short ops (a decode step) does not pay the ~30 us wake-up of a sleeping thread each time.
// - parallel_for called from inside a parallel_for task runs serially on the calling thread.
#pragma once
#include <cstdint>
#include <functional>
#include <mutex>

namespace bts {

int num_threads();
void set_num_threads(int n);  // 1..256; takes effect for the next op

// Runs fn(begin, end, thread_index) over [0, n) split into at most num_threads() contiguous chunks of
// at least `grain` items. Blocks until every chunk is done. Exceptions in tasks are rethrown here.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

// Runs fn(thread_index, n_threads) once on each compute thread (for kernels that partition work
// themselves, e.g. GEMM's 2-D tiling).
void parallel_run(const std::function<void(int, int)>& fn);

// Serialises ops across callers (JS thread and libuv workers). Re-entrant for the holding thread.
class ComputeLock {
 public:
  ComputeLock();
  ~ComputeLock();
  ComputeLock(const ComputeLock&) = delete;
  ComputeLock& operator=(const ComputeLock&) = delete;

 private:
  bool owned_;
};

}  // namespace bts
