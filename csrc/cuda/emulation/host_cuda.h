// Host emulation of the CUDA execution model, so that the kernel sources in csrc/cuda (written
// against the contract in device.h) compile with g++ and run on a CPU in tests.
//
// Model:
// * A launch runs the whole grid before LONGFORMER_LAUNCH returns. Blocks are spread over a few OS
//   threads (block b on worker b % workers); the threads of one block are cooperative fibers on one
//   OS thread, switched by a small x86-64 stack switch (ucontext's swapcontext makes a system call
//   per switch, which dominated run time for barrier- and shuffle-heavy kernels).
// * __syncthreads() parks the fiber until every fiber of the block has arrived; warp operations
//   (shuffles, votes, __syncwarp) park it until the 32 lanes of its warp have arrived. When nothing
//   can run and the block has not finished, the barrier is divergent: the launch throws
//   std::runtime_error naming the block, the threads and what they wait for.
// * Between barriers fibers run in the order set by LONGFORMER_EMULATION_ORDER = forward (default),
//   reverse or shuffle (a fresh permutation per barrier phase, seeded by LONGFORMER_EMULATION_SEED,
//   default 0, and the block index, so every run is reproducible). A missing barrier then gives wrong
//   results instead of working by luck. LONGFORMER_EMULATION_THREADS sets the worker count (default
//   2) and LONGFORMER_EMULATION_STACK_KB each fiber's stack (default 256).
// * Static __shared__ arrays are `static thread_local`: one copy per worker, which runs one block at
//   a time. Dynamic shared memory is refilled with 0xFF bytes before every block so that reading it
//   before writing shows up.
// * cp.async copies (async_copy.h) land only when the issuing thread waits for their group (see
//   async_copy_16 below), so a missing wait gives wrong results too.
// It cannot show data races between threads of a block, memory-model effects, or performance.
//
// Use: g++ -std=c++20 -DLONGFORMER_HOST_EMULATION -I csrc/cuda -I csrc/include -pthread kernel.cu ...
// (add -x c++ for .cu files; -Wno-unknown-pragmas silences `#pragma unroll`, which g++ 12 can't
// be told to ignore from a header). A kernel template with several arguments goes into
// LONGFORMER_LAUNCH in parentheses, `(kernel<T, 64>)`, because of the commas. -fsanitize=address
// works: the fiber switches carry ASan's annotations.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LONGFORMER_EMULATION_ASAN 1
#endif

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA host emulation supports Linux x86-64 only (its fiber switch is x86-64 assembly)"
#endif

// ---- Qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __constant__
// One copy per OS thread; a worker runs one block at a time, so this is the block's copy.
#define __shared__ static thread_local
// __restrict__ is a g++ keyword already.

// ---- Built-in types and variables -------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (host emulation)";
    case cudaErrorInvalidValue:
      return "invalid argument (host emulation; e.g. more than 48 KiB of dynamic shared memory without "
             "allow_shared_bytes, or more than 227 KiB)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (host emulation)";
  }
  return "unknown error (host emulation)";
}

// The scheduler stores the running fiber's coordinates here before switching to it. Fibers never
// move between OS threads, so thread_local is per fiber as far as kernel code can tell.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---- Fiber stack switch -----------------------------------------------------------------------
// longformer_emu_switch(save, to): pushes the callee-saved registers, stores the stack pointer in
// *save, loads `to` and pops the registers saved there. A new fiber's stack is prepared so that its
// first switch "returns" into longformer_emu_start, which calls r13(r12). The COMDAT group lets
// every translation unit carry a copy. .cfi_undefined rip ends backtraces at the fiber's bottom.
asm(R"(
  .pushsection .text.longformer_emu_switch,"axG",@progbits,longformer_emu_switch,comdat
  .globl longformer_emu_switch
  .hidden longformer_emu_switch
  .type longformer_emu_switch,@function
longformer_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size longformer_emu_switch, .-longformer_emu_switch
  .globl longformer_emu_start
  .hidden longformer_emu_start
  .type longformer_emu_start,@function
longformer_emu_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size longformer_emu_start, .-longformer_emu_start
  .popsection
)");
extern "C" __attribute__((visibility("hidden"))) void longformer_emu_switch(void** save, void* to);
extern "C" __attribute__((visibility("hidden"))) void longformer_emu_start();

namespace longformer::emulation {

enum class State : uint8_t { kReady, kBlockBarrier, kWarpBarrier, kDone, kFailed };

// One cp.async of 16 bytes in flight: the source bytes (read at issue) and where they will land.
struct AsyncCopy {
  void* dst;
  uint64_t group;  // the commit group it belongs to (Fiber::open_group when issued)
  unsigned char bytes[16];
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable byte (a guard page lies below)
  State state = State::kReady;
  uint32_t wait_generation = 0;  // the warp barrier generation it waits to see pass
  uint32_t warp_ops = 0;         // slot-buffer parity of its next shuffle/vote
  uint3 tid{0, 0, 0};
  std::vector<AsyncCopy> async_copies;  // issued, not yet landed, in issue order
  uint64_t open_group = 0;              // groups committed so far; new copies join this one
};

struct Warp {
  uint32_t arrived = 0;
  uint32_t generation = 0;
  uint64_t slots[2][32] = {};  // double-buffered, so one warp barrier per exchange suffices
};

struct Settings {
  enum Order { kForward, kReverse, kShuffle } order = kForward;
  uint64_t seed = 0;
  int workers = 2;
  size_t stack_bytes = 256 * 1024;
};

inline Settings read_settings() {
  Settings s;
  if (const char* o = std::getenv("LONGFORMER_EMULATION_ORDER"); o && *o) {
    std::string v(o);
    if (v == "forward") s.order = Settings::kForward;
    else if (v == "reverse") s.order = Settings::kReverse;
    else if (v == "shuffle") s.order = Settings::kShuffle;
    else throw std::invalid_argument("LONGFORMER_EMULATION_ORDER must be forward, reverse or shuffle, not '" + v + "'");
  }
  if (const char* v = std::getenv("LONGFORMER_EMULATION_SEED"); v && *v) s.seed = std::strtoull(v, nullptr, 10);
  if (const char* v = std::getenv("LONGFORMER_EMULATION_THREADS"); v && *v) s.workers = std::max(1, std::atoi(v));
  if (const char* v = std::getenv("LONGFORMER_EMULATION_STACK_KB"); v && *v)
    s.stack_bytes = size_t(std::max(64, std::atoi(v))) * 1024;
  return s;
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline std::string coords(uint3 v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", v.x, v.y, v.z);
  return buf;
}

// Everything one OS thread needs to run blocks; kept across launches so stacks are mapped once.
struct Worker {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> order;
  size_t stack_bytes = 0;
  void* scheduler_sp = nullptr;
  int current = -1;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  void (*body)(const void*) = nullptr;  // runs the kernel with the launch's arguments
  const void* body_args = nullptr;
  std::exception_ptr fiber_error;
  bool stacks_dirty = false;  // an aborted block left poisoned frames behind (ASan)
#ifdef LONGFORMER_EMULATION_ASAN
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif

  ~Worker() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack - page_size(), stack_bytes + page_size());
    ::operator delete(smem, std::align_val_t(64));
  }
  static size_t page_size() { return size_t(sysconf(_SC_PAGESIZE)); }

  // Maps stacks for n fibers (reusing earlier ones); a PROT_NONE page below each turns an overflow
  // into a crash instead of silent corruption of the neighbouring fiber.
  void ensure_fibers(size_t n, size_t want_stack) {
    if (want_stack != stack_bytes) {
      for (Fiber& f : fibers)
        if (f.stack) munmap(f.stack - page_size(), stack_bytes + page_size());
      fibers.clear();
      stack_bytes = want_stack;
    }
    while (fibers.size() < n) {
      void* p = mmap(nullptr, stack_bytes + page_size(), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("host emulation: cannot map a fiber stack");
      mprotect(p, page_size(), PROT_NONE);
      fibers.emplace_back().stack = static_cast<char*>(p) + page_size();
    }
  }

  void set_shared_bytes(size_t bytes) {
    if (bytes == smem_bytes && smem) return;
    ::operator delete(smem, std::align_val_t(64));
    smem_bytes = bytes;  // exact size, so ASan catches reads past the end
    smem = static_cast<unsigned char*>(::operator new(std::max<size_t>(bytes, 1), std::align_val_t(64)));
  }

  // Called by a fiber: hands control back to the scheduler until it is resumed.
  void yield() {
    Fiber& f = fibers[current];
#ifdef LONGFORMER_EMULATION_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, scheduler_stack, scheduler_stack_size);
    longformer_emu_switch(&f.sp, scheduler_sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    longformer_emu_switch(&f.sp, scheduler_sp);
#endif
  }

  void resume(int i) {
    Fiber& f = fibers[i];
    current = i;
    threadIdx = f.tid;
#ifdef LONGFORMER_EMULATION_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, stack_bytes);
    longformer_emu_switch(&scheduler_sp, f.sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    longformer_emu_switch(&scheduler_sp, f.sp);
#endif
  }

  static void fiber_main(Worker* w);
  void prepare(Fiber& f) {
    // Seven words popped by longformer_emu_switch: r15 r14 r13 r12 rbx rbp, then the return address.
    // After that `ret` the stack pointer is 16-byte aligned, as the call in longformer_emu_start needs.
    auto top = reinterpret_cast<uintptr_t>(f.stack + stack_bytes) & ~uintptr_t(15);
    auto* words = reinterpret_cast<void**>(top - 16 - 7 * sizeof(void*));
#ifdef LONGFORMER_EMULATION_ASAN
    // The previous fiber on this stack ended inside fiber_main, whose frame (never returned from)
    // stays poisoned; clear the top of the stack so the new fiber starts clean.
    const size_t clean = std::min<size_t>(stack_bytes, 16384);
    __asan_unpoison_memory_region(f.stack + stack_bytes - clean, clean);
#endif
    words[0] = words[1] = nullptr;
    words[2] = reinterpret_cast<void*>(&Worker::fiber_main);  // r13
    words[3] = this;                                          // r12
    words[4] = words[5] = nullptr;
    words[6] = reinterpret_cast<void*>(&longformer_emu_start);
    f.sp = words;
    f.state = State::kReady;
    f.warp_ops = 0;
    f.async_copies.clear();  // copies a thread never waited for are gone with its block
    f.open_group = 0;
  }

  void run_block(uint64_t linear_block, dim3 grid, dim3 block, const Settings& s);
  [[noreturn]] void report_stuck(size_t n, dim3 block);
};

inline thread_local Worker* t_worker = nullptr;

inline void Worker::fiber_main(Worker* w) {
#ifdef LONGFORMER_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w->scheduler_stack, &w->scheduler_stack_size);
#endif
  const int id = w->current;
  try {
    w->body(w->body_args);
    w->fibers[id].state = State::kDone;
  } catch (...) {
    w->fiber_error = std::current_exception();
    w->fibers[id].state = State::kFailed;
  }
#ifdef LONGFORMER_EMULATION_ASAN
  __sanitizer_start_switch_fiber(nullptr, w->scheduler_stack, w->scheduler_stack_size);
#endif
  longformer_emu_switch(&w->fibers[id].sp, w->scheduler_sp);  // never resumed
  __builtin_trap();
}

inline void Worker::run_block(uint64_t linear_block, dim3 grid, dim3 block, const Settings& s) {
  const size_t n = size_t(block.x) * block.y * block.z;
  blockIdx = uint3{unsigned(linear_block % grid.x), unsigned(linear_block / grid.x % grid.y),
                   unsigned(linear_block / (uint64_t(grid.x) * grid.y))};
  if (stacks_dirty) {
#ifdef LONGFORMER_EMULATION_ASAN
    for (Fiber& f : fibers) __asan_unpoison_memory_region(f.stack, stack_bytes);
#endif
    stacks_dirty = false;
  }
  for (size_t i = 0; i < n; ++i) {
    fibers[i].tid = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (size_t(block.x) * block.y))};
    prepare(fibers[i]);
  }
  warps.assign((n + 31) / 32, Warp{});
  if (smem_bytes) std::memset(smem, 0xFF, smem_bytes);
  order.resize(n);
  for (size_t i = 0; i < n; ++i) order[i] = int(s.order == Settings::kReverse ? n - 1 - i : i);
  uint64_t rng = s.seed * 0x100000001B3ull ^ (linear_block + 1) * 0x9E3779B97F4A7C15ull;

  size_t done = 0;
  for (;;) {  // one iteration per barrier phase
    if (s.order == Settings::kShuffle)
      for (size_t i = n - 1; i > 0; --i) std::swap(order[i], order[splitmix64(rng) % (i + 1)]);
    bool progress = true;
    while (progress) {  // passes over the block until nobody can move
      progress = false;
      for (int i : order) {
        Fiber& f = fibers[i];
        if (f.state == State::kWarpBarrier && warps[i / 32].generation != f.wait_generation) f.state = State::kReady;
        if (f.state != State::kReady) continue;
        resume(i);
        progress = true;
        if (f.state == State::kFailed) {
          stacks_dirty = true;
          std::exception_ptr e = std::exchange(fiber_error, nullptr);
          std::string where = "host emulation: block " + coords(blockIdx) + " thread " + coords(f.tid) + ": ";
          try {
            std::rethrow_exception(e);
          } catch (const std::exception& ex) {
            throw std::runtime_error(where + ex.what());
          }
        }
        if (f.state == State::kDone) ++done;
      }
    }
    if (done == n) return;
    bool all_at_barrier = true;
    for (size_t i = 0; i < n; ++i) all_at_barrier &= fibers[i].state == State::kBlockBarrier;
    if (!all_at_barrier) report_stuck(n, block);
    for (size_t i = 0; i < n; ++i) fibers[i].state = State::kReady;
  }
}

// Nothing can run, yet not every thread finished or waits at __syncthreads: describe who waits where.
inline void Worker::report_stuck(size_t n, dim3 block) {
  stacks_dirty = true;
  size_t at_block = 0, at_warp = 0, done = 0;
  int first_block = -1, first_warp = -1, first_done = -1;
  for (size_t i = 0; i < n; ++i) {
    switch (fibers[i].state) {
      case State::kBlockBarrier: ++at_block; if (first_block < 0) first_block = int(i); break;
      case State::kWarpBarrier: ++at_warp; if (first_warp < 0) first_warp = int(i); break;
      default: ++done; if (first_done < 0) first_done = int(i); break;
    }
  }
  std::string msg = "host emulation: deadlock in block " + coords(blockIdx) + " (block size " +
                    std::to_string(block.x) + "x" + std::to_string(block.y) + "x" + std::to_string(block.z) + "): ";
  if (at_warp) {
    int w = first_warp / 32;
    msg += std::to_string(at_warp) + " threads wait at a warp operation (__shfl*_sync/__ballot_sync/__any_sync/"
           "__all_sync/__syncwarp), e.g. thread " + coords(fibers[first_warp].tid) + " (warp " + std::to_string(w) +
           "), while other lanes of its warp ";
    for (int l = w * 32; l < w * 32 + 32 && size_t(l) < n; ++l)
      if (fibers[l].state != State::kWarpBarrier) {
        msg += fibers[l].state == State::kBlockBarrier ? "wait at __syncthreads(), e.g. thread " : "have exited, e.g. thread ";
        msg += coords(fibers[l].tid);
        break;
      }
    msg += " (divergent warp operation: every lane of the warp must take part)";
  } else {
    msg += "divergent __syncthreads(): " + std::to_string(at_block) + " of " + std::to_string(n) +
           " threads wait at the barrier (e.g. thread " + coords(fibers[first_block].tid) + ") but " +
           std::to_string(done) + " have exited (e.g. thread " + coords(fibers[first_done].tid) +
           "); every thread of the block must reach each __syncthreads()";
  }
  throw std::runtime_error(msg);
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<std::unique_ptr<Worker>>& workers() {
  static std::vector<std::unique_ptr<Worker>> w;
  return w;
}

// Runs every block of the grid; returns a cudaError_t value for bad configurations and throws for
// errors found while running (divergent barriers, exceptions thrown in kernel code).
// Dynamic shared memory above 48 KiB needs an opt-in per kernel on the GPU; recording the opt-ins
// makes a forgotten allow_shared_bytes fail here too instead of only on the GPU.
// The most dynamic shared memory a block may opt in to: 227 KiB as on an H100, or
// LONGFORMER_EMULATION_SHARED_KIB (say 99, an sm_86/sm_89 GPU) to test what a smaller GPU runs.
inline int64_t shared_bytes_limit() {
  if (const char* v = std::getenv("LONGFORMER_EMULATION_SHARED_KIB"); v && *v) return std::atoll(v) * 1024;
  return 227 * 1024;
}

inline int64_t& allowed_shared_bytes(const void* kernel) {
  static std::map<const void*, int64_t> allowed;
  return allowed[kernel];
}
inline std::mutex& allowed_mutex() {
  static std::mutex m;
  return m;
}

inline int run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, void (*body)(const void*),
                    const void* args) {
  if (t_worker) throw std::logic_error("host emulation: a kernel launched another kernel (not supported)");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    return cudaErrorInvalidConfiguration;
  if (int64_t(shared_bytes) > shared_bytes_limit()) return cudaErrorInvalidValue;
  if (shared_bytes > 48 * 1024) {
    std::lock_guard<std::mutex> lock(allowed_mutex());
    if (int64_t(shared_bytes) > allowed_shared_bytes(kernel)) return cudaErrorInvalidValue;
  }
  const Settings s = read_settings();
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const int nworkers = int(std::min<uint64_t>(uint64_t(s.workers), blocks));

  std::lock_guard<std::mutex> lock(launch_mutex());
  while (workers().size() < size_t(nworkers)) workers().push_back(std::make_unique<Worker>());
  // The error reported is the one of the lowest failing block, whatever the timing: a worker only
  // stops at blocks past the lowest failure seen so far.
  std::atomic<uint64_t> first_failure{UINT64_MAX};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(nworkers));
  std::vector<uint64_t> failed_block(static_cast<size_t>(nworkers), UINT64_MAX);
  auto work = [&](int w) {
    Worker& wk = *workers()[size_t(w)];
    uint64_t b = uint64_t(w);
    try {
      wk.ensure_fibers(threads, s.stack_bytes);
      wk.set_shared_bytes(shared_bytes);
      wk.body = body;
      wk.body_args = args;
      t_worker = &wk;
      gridDim = grid;
      blockDim = block;
      for (; b < blocks && b < first_failure.load(); b += uint64_t(nworkers)) wk.run_block(b, grid, block, s);
    } catch (...) {
      errors[size_t(w)] = std::current_exception();
      failed_block[size_t(w)] = b;
      uint64_t cur = first_failure.load();
      while (b < cur && !first_failure.compare_exchange_weak(cur, b)) {
      }
    }
    wk.current = -1;
    t_worker = nullptr;
  };
  std::vector<std::thread> helpers;
  for (int w = 1; w < nworkers; ++w) helpers.emplace_back(work, w);
  work(0);
  for (std::thread& t : helpers) t.join();
  for (int w = 0; w < nworkers; ++w)
    if (errors[size_t(w)] && failed_block[size_t(w)] == first_failure.load()) std::rethrow_exception(errors[size_t(w)]);
  return cudaSuccess;
}

template <typename... P>
struct KernelCall {
  void (*kernel)(P...);
  std::tuple<P...> args;  // converted once, like CUDA's parameter buffer; each thread gets a copy
  static void run(const void* self) {
    auto* c = static_cast<const KernelCall*>(self);
    std::apply(c->kernel, c->args);
  }
};

template <typename... P, typename... A>
int launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "LONGFORMER_LAUNCH: wrong number of kernel arguments");
  KernelCall<P...> call{kernel, std::tuple<P...>(std::forward<A>(args)...)};
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, &KernelCall<P...>::run, &call);
}

inline Worker& current_worker(const char* what) {
  if (!t_worker || t_worker->current < 0) throw std::logic_error(std::string(what) + " called outside a kernel");
  return *t_worker;
}

// Parks the calling lane until all 32 lanes of its warp arrived; the last one to arrive goes on.
inline void warp_barrier(Worker& w) {
  Fiber& f = w.fibers[w.current];
  Warp& warp = w.warps[w.current / 32];
  if (++warp.arrived == 32) {
    warp.arrived = 0;
    ++warp.generation;
    return;
  }
  f.state = State::kWarpBarrier;
  f.wait_generation = warp.generation;
  w.yield();
}

inline Worker& warp_op(unsigned mask, const char* what) {
  Worker& w = current_worker(what);
  if (mask != 0xffffffffu)
    throw std::logic_error(std::string(what) + ": the host emulation supports only the full-warp mask 0xffffffff");
  if (uint64_t(blockDim.x) * blockDim.y * blockDim.z % 32 != 0)
    throw std::logic_error(std::string(what) + ": the host emulation needs blocks whose size is a multiple of 32");
  return w;
}

// Every lane publishes `bits` in its warp's slot buffer, waits for the warp, and reads the buffer.
// Two buffers alternate, so a lane can't overwrite a slot that a slower lane has yet to read.
inline const uint64_t* exchange(Worker& w, uint64_t bits) {
  Fiber& f = w.fibers[w.current];
  uint64_t* slots = w.warps[w.current / 32].slots[f.warp_ops++ & 1];
  slots[w.current % 32] = bits;
  warp_barrier(w);
  return slots;
}

template <typename T>
T shuffle(unsigned mask, T value, int width, const char* what, int (*source)(int lane, int arg, int width), int arg) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
  Worker& w = warp_op(mask, what);
  if (width < 1 || width > 32 || (width & (width - 1)))
    throw std::logic_error(std::string(what) + ": width must be a power of two <= 32");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const uint64_t* slots = exchange(w, bits);
  const int lane = w.current % 32;
  T out;
  std::memcpy(&out, &slots[source(lane, arg, width)], sizeof(T));
  return out;
}

inline unsigned ballot(unsigned mask, int predicate, const char* what) {
  Worker& w = warp_op(mask, what);
  const uint64_t* slots = exchange(w, predicate ? 1 : 0);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= unsigned(slots[l]) << l;
  return bits;
}

// ---- cp.async (csrc/cuda/async_copy.h): asynchronous 16-byte copies, global -> shared ----------
// A copy reads its source when issued, but its bytes reach shared memory only when the issuing
// thread waits for its commit group, the latest moment the PTX memory model allows; until then the
// destination keeps what it held (the previous tile, or the 0xFF fill). So a missing or too-weak
// wait reads stale bytes, and a wait not followed by __syncthreads() before other threads read the
// data shows under the reverse and shuffle orders, like any missing barrier.
inline Fiber& async_fiber(const char* what) {
  Worker& w = current_worker(what);
  return w.fibers[w.current];
}

inline void async_copy_16(void* dst, const void* src, bool from_source) {
  Fiber& f = async_fiber("cp_async_16");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (from_source && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    throw std::logic_error("cp_async_16: source and destination must be 16-byte aligned");
  AsyncCopy& c = f.async_copies.emplace_back();
  c.dst = dst;
  c.group = f.open_group;
  if (from_source) std::memcpy(c.bytes, src, 16);
  else std::memset(c.bytes, 0, 16);
}

inline void async_commit() { ++async_fiber("cp_async_commit").open_group; }

// Lands, in issue order, every copy of the committed groups but the `pending` most recent ones.
// Copies not yet committed stay in flight (wait_group only waits for committed groups).
inline void async_wait(uint64_t pending) {
  Fiber& f = async_fiber("cp_async_wait");
  const uint64_t landed_below = f.open_group > pending ? f.open_group - pending : 0;
  size_t kept = 0;
  for (AsyncCopy& c : f.async_copies) {
    if (c.group < landed_below) std::memcpy(c.dst, c.bytes, 16);
    else f.async_copies[kept++] = c;
  }
  f.async_copies.resize(kept);
}

}  // namespace longformer::emulation

#define LONGFORMER_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)                                  \
  (::longformer::emulation::launch((kernel), dim3(grid), dim3(block), static_cast<size_t>(shared_bytes), \
                                   static_cast<cudaStream_t>(stream) __VA_OPT__(, ) __VA_ARGS__))

namespace longformer::cuda {
// The current block's dynamic shared memory (16-byte aligned, refilled with 0xFF bytes per block).
template <typename T>
inline T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(emulation::current_worker("dynamic_shared_memory").smem);
}
// Same contracts as the CUDA versions: the emulated GPU's limit (emulation::shared_bytes_limit), and
// 0 on success or cudaErrorInvalidValue above it.
inline int64_t max_shared_bytes_per_block() { return emulation::shared_bytes_limit(); }
template <typename Kernel>
inline int allow_shared_bytes(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  if (bytes > emulation::shared_bytes_limit()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(emulation::allowed_mutex());
  int64_t& allowed = emulation::allowed_shared_bytes(reinterpret_cast<const void*>(kernel));
  allowed = std::max(allowed, bytes);
  return 0;
}
}  // namespace longformer::cuda

// ---- Synchronisation, warp shuffles and votes --------------------------------------------------
inline void __syncthreads() {
  auto& w = longformer::emulation::current_worker("__syncthreads");
  w.fibers[w.current].state = longformer::emulation::State::kBlockBarrier;
  w.yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  longformer::emulation::warp_barrier(longformer::emulation::warp_op(mask, "__syncwarp"));
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  return longformer::emulation::shuffle(mask, v, width, "__shfl_sync",
      [](int lane, int s, int w) { return (lane & ~(w - 1)) + (s & (w - 1)); }, src);
}
// Lanes whose partner lies in a later segment of `width` lanes keep their own value (CUDA rule).
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return longformer::emulation::shuffle(mask, v, width, "__shfl_xor_sync",
      [](int lane, int m, int w) { int s = lane ^ m; return s >= (lane & ~(w - 1)) + w ? lane : s; }, lane_mask);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return longformer::emulation::shuffle(mask, v, width, "__shfl_down_sync",
      [](int lane, int d, int w) { int s = lane + d; return s >= (lane & ~(w - 1)) + w ? lane : s; }, int(delta));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return longformer::emulation::shuffle(mask, v, width, "__shfl_up_sync",
      [](int lane, int d, int w) { int s = lane - d; return s < (lane & ~(w - 1)) ? lane : s; }, int(delta));
}
inline unsigned __ballot_sync(unsigned mask, int p) { return longformer::emulation::ballot(mask, p, "__ballot_sync"); }
inline int __any_sync(unsigned mask, int p) { return longformer::emulation::ballot(mask, p, "__any_sync") != 0; }
inline int __all_sync(unsigned mask, int p) { return longformer::emulation::ballot(mask, p, "__all_sync") == 0xffffffffu; }
inline unsigned __activemask() { return 0xffffffffu; }

// ---- Atomics: blocks on different workers run in parallel, so these are real atomics ----------
template <typename T>
inline T longformer_emu_atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline float atomicAdd(float* p, float v) { return longformer_emu_atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return longformer_emu_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return longformer_emu_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return longformer_emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return longformer_emu_atomic_add(p, v); }
template <typename T>
inline T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value either way
}
template <typename T>
inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }

// ---- Half types: 16-bit structs with the IEEE binary16 / bfloat16 bit layouts -----------------
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2);

inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

inline __half __float2half_rn(float f) {
  const uint32_t bits = __float_as_uint(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t a = bits & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{uint16_t(sign | 0x7e00u)};  // NaN -> quiet NaN
  if (a >= 0x477ff000u) return __half{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to infinity
  if (a >= 0x38800000u) {                                          // normal result (>= 2^-14)
    a += 0xfffu + ((a >> 13) & 1u);                                // round to nearest even at bit 13
    return __half{uint16_t(sign | ((a - 0x38000000u) >> 13))};     // rebias exponent 127 -> 15
  }
  if (a < 0x33000000u) return __half{uint16_t(sign)};  // <= 2^-25 rounds to zero
  // Subnormal result: the value in units of 2^-24 is m * 2^(e - 126), rounded to nearest even.
  const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
  uint32_t r = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (r & 1u))) ++r;
  return __half{uint16_t(sign | r)};
}
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = std::ldexp(float(m), -24);  // exact: subnormal halves are m * 2^-24
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((bits >> 16) | 0x40u)};  // quiet NaN
  // Integer rounding of the upper half is exact round-to-nearest-even, including subnormals and the
  // carry into the exponent (the largest finite values round up to infinity).
  return __nv_bfloat16{uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.__x) << 16); }

// ---- Math and integer helpers that CUDA provides as global device functions -------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
#define LONGFORMER_EMU_MINMAX(T)                  \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
LONGFORMER_EMU_MINMAX(int)
LONGFORMER_EMU_MINMAX(unsigned)
LONGFORMER_EMU_MINMAX(long)
LONGFORMER_EMU_MINMAX(unsigned long)
LONGFORMER_EMU_MINMAX(long long)
LONGFORMER_EMU_MINMAX(unsigned long long)
#undef LONGFORMER_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
