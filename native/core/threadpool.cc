// threadpool.cc: the compute pool described in bts/threadpool.h.
//
// One job slot: the caller publishes a job and bumps `generation`; workers spin on `generation` for
// BTS_SPIN_US microseconds after their last job, then sleep on a condition variable. Completion is a
// countdown the caller spins on (it has just done its own share, so the wait is short).
#include "bts/threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

#include "bts/common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BTS_PAUSE() _mm_pause()
#else
#define BTS_PAUSE() std::this_thread::yield()
#endif

namespace bts {
namespace {

// True on a compute thread while it runs a share of a job: nested parallel calls then run serially
// and take no lock (the job's caller already holds it).
thread_local bool tl_in_job = false;

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* s = std::getenv(name);
  if (!s || !*s) return fallback;
  char* end = nullptr;
  long v = std::strtol(s, &end, 10);
  if (end == s || v < lo || v > hi) return fallback;
  return int(v);
}

class Pool {
 public:
  ~Pool() { stop_workers(); }

  int threads() {
    if (n_ <= 0) {
      int hw = int(std::thread::hardware_concurrency());
      n_ = env_int("BTS_THREADS", std::max(1, hw), 1, 256);
      spin_us_ = env_int("BTS_SPIN_US", 300, 0, 1000000);
    }
    return n_;
  }

  void set_threads(int n) {
    threads();
    if (n == n_) return;
    stop_workers();
    n_ = n;
  }

  void run(const std::function<void(int, int)>& fn) {
    const int n = threads();
    if (n == 1 || tl_in_job) {
      bool was = tl_in_job;
      tl_in_job = true;
      try {
        fn(0, 1);
      } catch (...) {
        tl_in_job = was;
        throw;
      }
      tl_in_job = was;
      return;
    }
    if (int(workers_.size()) != n - 1) start_workers(n - 1);
    job_ = &fn;
    job_threads_ = n;
    error_ = nullptr;
    remaining_.store(int(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    if (sleepers_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    tl_in_job = true;
    std::exception_ptr mine;
    try {
      fn(0, n);
    } catch (...) {
      mine = std::current_exception();
    }
    tl_in_job = false;
    int spins = 0;
    while (remaining_.load(std::memory_order_acquire) != 0) {
      BTS_PAUSE();
      if (++spins > 1 << 16) std::this_thread::yield();
    }
    job_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void start_workers(int count) {
    stop_workers();
    stop_.store(false);
    // The generation is read here, before any job is published, so a worker that starts late still
    // sees the first job as new.
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int i = 0; i < count; i++) workers_.emplace_back([this, i, gen] { worker(i + 1, gen); });
  }

  void stop_workers() {
    if (workers_.empty()) return;
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_.store(true);
      cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  void worker(int index, uint64_t seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      for (;;) {
        if (stop_.load(std::memory_order_relaxed)) return;
        if (generation_.load(std::memory_order_acquire) != seen) break;
        BTS_PAUSE();
        if ((++spins & 255) == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          if (stop_.load()) return;
          break;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < job_threads_) {
        tl_in_job = true;
        try {
          (*job_)(index, job_threads_);
        } catch (...) {
          std::lock_guard<std::mutex> lk(m_);
          if (!error_) error_ = std::current_exception();
        }
        tl_in_job = false;
      }
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  int n_ = 0;
  int spin_us_ = 300;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  int job_threads_ = 1;
  std::exception_ptr error_;
  std::mutex m_;
  std::condition_variable cv_;
};

std::recursive_mutex& compute_mutex() {
  static std::recursive_mutex m;
  return m;
}

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destruction order
  return *p;
}

}  // namespace

ComputeLock::ComputeLock() : owned_(!tl_in_job) {
  if (owned_) compute_mutex().lock();
}
ComputeLock::~ComputeLock() {
  if (owned_) compute_mutex().unlock();
}

int num_threads() {
  ComputeLock lock;
  return pool().threads();
}

void set_num_threads(int n) {
  if (n < 1 || n > 256) throw Error("E_INVALID_ARGUMENT", "threads must be in 1..256, got " + std::to_string(n));
  ComputeLock lock;
  pool().set_threads(n);
}

void parallel_run(const std::function<void(int, int)>& fn) {
  ComputeLock lock;
  pool().run(fn);
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  ComputeLock lock;
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int threads = tl_in_job ? 1 : pool().threads();
  const int chunks = int(std::min<int64_t>(threads, max_chunks));
  if (chunks <= 1) {
    fn(0, n, 0);
    return;
  }
  pool().run([&](int t, int) {
    if (t >= chunks) return;
    int64_t b = n * t / chunks, e = n * (t + 1) / chunks;
    if (b < e) fn(b, e, t);
  });
}

}  // namespace bts
