// SIMT emulation of the subset of CUDA the kernels in csrc/cuda use, for running their own
// source on the CPU (tests only; see shared/design/simt.md and the README).
//
// Each CUDA thread of a block is a fiber with its own stack (a small register-switching routine
// on x86-64, glibc's ucontext elsewhere). The scheduler resumes every
// runnable fiber until it blocks at a barrier or a warp intrinsic, or exits; then it resolves
// the collectives, checking the rules of the CUDA execution model:
//   - __syncthreads: every thread of the block waits at the same barrier (none exited, none
//     elsewhere), else an error;
//   - __shfl_xor_sync: the caller is in the mask, every lane of the mask waits at the same
//     call with the same mask (none exited, none elsewhere), the source lane is in the mask;
//   - 16-byte pack accesses (vec_ptr) are 16-byte aligned;
//   - __shared__ arrays (LSE_SHARED) are per-block storage filled with 0xFF bytes (NaN);
//   - the grid runs under several schedules (threads between two barriers forward / reversed /
//     shuffled, blocks forward / reversed / shuffled); with every registered memory region
//     restored in between, the results of all schedules must be bitwise equal;
//   - registered regions (memory.h: guarded allocations) have guard bytes around them,
//     checked after every launch.
// Every violation throws c10::Error from the launch (host side, never inside a fiber), so a
// Python caller sees a RuntimeError and the process lives on.
//
// What this cannot show: speed, the hardware's exp precision (ex2.approx is exp2f here), real
// memory ordering across blocks or concurrently running blocks.
#pragma once

#include <c10/util/Exception.h>
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "memory.h"

#if defined(__SANITIZE_ADDRESS__)
#define LSE_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LSE_SIMT_ASAN 1
#endif
#endif
#ifdef LSE_SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- CUDA keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables of the running fiber (set by the scheduler before each resume).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace simt {

constexpr int kWarpSize = 32;

enum class State { Run, Barrier, Shfl, Exited };

// ---- fiber contexts -------------------------------------------------------------------------
// x86-64: switch stacks saving the callee-saved registers and the FP control words (no system
// call, unlike swapcontext, which saves the signal mask: ~50x faster here).
#if defined(__x86_64__) && defined(__linux__)
#define LSE_SIMT_ASM_SWITCH 1
extern "C" void lse_simt_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .weak lse_simt_switch
  .hidden lse_simt_switch
  .type lse_simt_switch, @function
lse_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lse_simt_switch, .-lse_simt_switch
)");
struct Context {
  void* sp = nullptr;
};
// A fresh context on [stack, stack + size) that starts in entry() (which never returns).
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* p = reinterpret_cast<uint64_t*>(top);
  *--p = 0;                                   // entry's (never used) return address
  *--p = reinterpret_cast<uint64_t>(entry);   // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--p = 0;       // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--p = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  c.sp = p;
}
inline void switch_context(Context& from, Context& to) { lse_simt_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  uint3 tid{0, 0, 0};
  State state = State::Run;
  // where it waits (call site) and the collective's arguments
  const char* file = nullptr;
  int line = 0;
  unsigned mask = 0;
  int lane_mask = 0, width = 0;
  unsigned char value[16];
  unsigned char result[16];
  size_t value_size = 0;
  void* fake_stack = nullptr;  // ASan fiber bookkeeping
};

struct Block {
  std::vector<Fiber>* fibers = nullptr;
  int nthreads = 0;
  int current = -1;
  Context sched;
  std::string error;
  std::vector<std::pair<const void*, void*>> shared;  // declaration tag -> storage
  const std::function<void()>* body = nullptr;
  size_t stack_size = 0;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
};

inline Block*& current_block() {
  static Block* b = nullptr;
  return b;
}

inline std::string site(const char* file, int line) {
  return std::string(file ? file : "?") + ":" + std::to_string(line);
}

inline std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
         std::to_string(f.tid.z) + ") of block (" + std::to_string(blockIdx.x) + "," +
         std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// Back to the scheduler from the running fiber.
inline void yield_to_scheduler(bool exiting = false) {
  Block* b = current_block();
  Fiber& f = (*b->fibers)[b->current];
#ifdef LSE_SIMT_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, b->sched_stack_bottom,
                                 b->sched_stack_size);
#else
  (void)exiting;
#endif
  switch_context(f.ctx, b->sched);
#ifdef LSE_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

// A rule violation inside a kernel: unwinds the fiber's own stack to fiber_main, which records
// it and ends the fiber (kernel code has no try blocks).
struct KernelFault {
  std::string message;
};
[[noreturn]] inline void fail(std::string msg) { throw KernelFault{std::move(msg)}; }

inline Fiber& self() {
  Block* b = current_block();
  return (*b->fibers)[b->current];
}

inline int linear_id(const uint3& t) {
  return int(t.x + t.y * blockDim.x + t.z * blockDim.x * blockDim.y);
}

inline void fiber_main() {
  Block* b = current_block();
#ifdef LSE_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack_bottom, &b->sched_stack_size);
#endif
  try {
    (*b->body)();
  } catch (KernelFault& e) {
    if (b->error.empty()) b->error = std::move(e.message);
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = std::string("exception in a kernel thread: ") + e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "unknown exception in a kernel thread";
  }
  self().state = State::Exited;
  yield_to_scheduler(true);
  std::abort();
}

// ---- intrinsics ------------------------------------------------------------------------------

inline void syncthreads_at(const char* file, int line) {
  Fiber& f = self();
  f.state = State::Barrier;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
}

template <typename T>
T shfl_xor_at(unsigned mask, T var, int lane_mask, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a small trivial type");
  Fiber& f = self();
  const int lane = linear_id(f.tid) % kWarpSize;
  if (!(width >= 1 && width <= kWarpSize && (width & (width - 1)) == 0))
    fail("__shfl_xor_sync at " + site(file, line) + ": width " + std::to_string(width) +
         " is not a power of two <= 32");
  if (!((mask >> lane) & 1u))
    fail("__shfl_xor_sync at " + site(file, line) + ": " + thread_name(f) + " (lane " +
         std::to_string(lane) + ") calls it with a mask that does not name it");
  f.state = State::Shfl;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.lane_mask = lane_mask;
  f.width = width;
  f.value_size = sizeof(T);
  std::memcpy(f.value, &var, sizeof(T));
  yield_to_scheduler();
  T out;
  std::memcpy(&out, self().result, sizeof(T));
  return out;
}

// ---- shared memory ----------------------------------------------------------------------------

// Per-block storage for one __shared__ declaration (tag: a static unique to the declaration
// and its template instance), filled with 0xFF bytes (NaN for every float type) when the block
// first reaches it.
template <typename T>
T* shared_array(const void* tag, size_t n) {
  Block* b = current_block();
  for (auto& e : b->shared)
    if (e.first == tag) return static_cast<T*>(e.second);
  const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
  void* p = std::aligned_alloc(16, (bytes + 15) / 16 * 16);
  std::memset(p, 0xFF, bytes);
  b->shared.emplace_back(tag, p);
  return static_cast<T*>(p);
}

// ---- the scheduler -----------------------------------------------------------------------------

// Thread / block order of a schedule: 0 forward, 1 reversed, s >= 2 a shuffle seeded with s.
inline void order_for(int schedule, int round, std::vector<int>& order) {
  for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
  if (schedule == 1) {
    std::reverse(order.begin(), order.end());
  } else if (schedule >= 2) {
    std::mt19937 rng(unsigned(schedule) * 7919u + unsigned(round));
    std::shuffle(order.begin(), order.end(), rng);
  }
}

// Resolves the warp collectives every waiting lane can complete; returns how many lanes it
// released, or sets b->error.
inline int resolve_warps(Block* b) {
  auto& fs = *b->fibers;
  const int n = b->nthreads;
  int released = 0;
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    for (int i = w0; i < std::min(n, w0 + kWarpSize); ++i) {
      Fiber& f = fs[i];
      if (f.state != State::Shfl) continue;
      // the group of f: every lane of its mask must wait at the same call with the same mask
      for (int l = 0; l < kWarpSize; ++l) {
        if (!((f.mask >> l) & 1u)) continue;
        const int j = w0 + l;
        std::string why;
        if (j >= n) {
          why = "does not exist (the block has " + std::to_string(n) + " threads)";
        } else if (fs[j].state == State::Exited) {
          why = "has exited";
        } else if (fs[j].state == State::Barrier) {
          why = "waits at __syncthreads at " + site(fs[j].file, fs[j].line);
        } else if (fs[j].state == State::Shfl &&
                   (fs[j].file != f.file || fs[j].line != f.line || fs[j].mask != f.mask)) {
          char m[16];
          std::snprintf(m, sizeof m, "0x%08x", fs[j].mask);
          why = "waits at __shfl_xor_sync at " + site(fs[j].file, fs[j].line) + " with mask " + m;
        }
        if (!why.empty()) {
          char m[16];
          std::snprintf(m, sizeof m, "0x%08x", f.mask);
          b->error = "__shfl_xor_sync at " + site(f.file, f.line) + " with mask " + m + ": lane " +
                     std::to_string(l) + " of warp " + std::to_string(w0 / kWarpSize) +
                     " is named in the mask but " + why + " (undefined behaviour on a GPU)";
          return 0;
        }
      }
      // complete it: every lane of the group reads its source lane's value
      for (int l = 0; l < kWarpSize; ++l) {
        if (!((f.mask >> l) & 1u)) continue;
        Fiber& g = fs[w0 + l];
        if (g.value_size != f.value_size || g.lane_mask != f.lane_mask || g.width != f.width) {
          b->error = "__shfl_xor_sync at " + site(f.file, f.line) +
                     ": the lanes of one call disagree on the value type, lane mask or width";
          return 0;
        }
        int src = l ^ g.lane_mask;
        const int max_lane = (l & ~(g.width - 1)) | (g.width - 1);
        if (src > max_lane || src >= kWarpSize) src = l;  // a later group: own value
        if (!((f.mask >> src) & 1u)) {
          b->error = "__shfl_xor_sync at " + site(f.file, f.line) + ": lane " + std::to_string(l) +
                     " reads lane " + std::to_string(src) + ", which the mask does not name";
          return 0;
        }
        std::memcpy(g.result, fs[w0 + src].value, g.value_size);
      }
      for (int l = 0; l < kWarpSize; ++l) {
        if (!((f.mask >> l) & 1u)) continue;
        fs[w0 + l].state = State::Run;
        ++released;
      }
    }
  }
  return released;
}

// Runs one block to completion under `schedule`; returns an error message or "".
inline std::string run_block(Block& b, int schedule) {
  auto& fs = *b.fibers;
  const int n = b.nthreads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = fs[i];
    f.state = State::Run;
    f.tid = uint3{unsigned(i % blockDim.x), unsigned((i / blockDim.x) % blockDim.y),
                  unsigned(i / (blockDim.x * blockDim.y))};
#ifdef LSE_SIMT_ASAN
    // the last frames of the stack's previous fiber never returned: clear their redzones
    ASAN_UNPOISON_MEMORY_REGION(f.stack, b.stack_size);
#endif
    make_context(f.ctx, f.stack, b.stack_size, fiber_main);
    f.fake_stack = nullptr;
  }
  std::vector<int> order(n);
  for (int round = 0;; ++round) {
    order_for(schedule, round, order);
    for (int i : order) {
      if (fs[i].state != State::Run) continue;
      b.current = i;
      threadIdx = fs[i].tid;
#ifdef LSE_SIMT_ASAN
      __sanitizer_start_switch_fiber(&b.sched_fake_stack, fs[i].stack, b.stack_size);
#endif
      switch_context(b.sched, fs[i].ctx);
#ifdef LSE_SIMT_ASAN
      __sanitizer_finish_switch_fiber(b.sched_fake_stack, nullptr, nullptr);
#endif
      if (!b.error.empty()) return b.error;
    }
    int exited = 0, at_barrier = 0;
    for (auto& f : fs) {
      exited += f.state == State::Exited;
      at_barrier += f.state == State::Barrier;
    }
    if (exited == n) return "";
    if (resolve_warps(&b) > 0) continue;
    if (!b.error.empty()) return b.error;
    // no warp collective can complete: the barrier must hold every thread of the block
    const Fiber* first = nullptr;
    for (auto& f : fs)
      if (f.state == State::Barrier) {
        first = &f;
        break;
      }
    for (auto& f : fs) {
      std::string why;
      if (f.state == State::Exited && at_barrier) {
        why = "has exited";
      } else if (f.state == State::Shfl) {
        why = "waits at __shfl_xor_sync at " + site(f.file, f.line) + " that cannot complete";
      } else if (f.state == State::Barrier && (f.file != first->file || f.line != first->line)) {
        why = "waits at another __syncthreads, at " + site(f.file, f.line);
      }
      if (!why.empty()) {
        return std::string("__syncthreads") +
               (first ? " at " + site(first->file, first->line) : std::string()) +
               " reached by only part of the block: " + thread_name(f) + " " + why +
               " (a deadlock or undefined behaviour on a GPU)";
      }
    }
    for (auto& f : fs)
      if (f.state == State::Barrier) f.state = State::Run;
  }
}

// Stacks for the fibers of a block, reused across launches; a PROT_NONE page below each
// catches a stack overflow.
struct StackPool {
  char* base = nullptr;
  size_t count = 0, stride = 0;
  static constexpr size_t kPage = 4096;
#ifdef LSE_SIMT_ASAN
  static constexpr size_t kStack = 128 * 1024;
#else
  static constexpr size_t kStack = 64 * 1024;
#endif
  char* get(size_t i) { return base + i * stride + kPage; }
  void reserve(size_t n) {
    if (n <= count) return;
    if (base) munmap(base, count * stride);
    stride = kStack + kPage;
    void* p = mmap(nullptr, n * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "simt: cannot map ", n, " fiber stacks");
    base = static_cast<char*>(p);
    count = n;
    for (size_t i = 0; i < n; ++i) mprotect(base + i * stride, kPage, PROT_NONE);
  }
};

inline StackPool& stack_pool() {
  static StackPool pool;
  return pool;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Counters for the tests: 16-byte pack loads [0] and stores [1] (vec_ptr to a const / non-const
// pack), and kernel launches [2], since the last reset (every schedule's accesses count).
inline std::atomic<int64_t>* counters() {
  static std::atomic<int64_t> n[3] = {0, 0, 0};
  return n;
}

// How many schedules every launch runs (>= 2); LSE_SIMT_SCHEDULES raises it (seeded shuffles).
inline int schedule_count() {
  const char* e = std::getenv("LSE_SIMT_SCHEDULES");
  const int n = e ? std::atoi(e) : 2;
  return std::max(n, 2);
}

inline void run_grid(const std::function<void()>& body, dim3 grid, dim3 block) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024, "simt launch: ", nthreads,
              " threads per block (CUDA allows 1..1024)");
  TORCH_CHECK(block.z <= 64, "simt launch: blockDim.z ", block.z, " > 64");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "simt launch: invalid grid (", grid.x, ",", grid.y, ",", grid.z, ")");
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  StackPool& pool = stack_pool();
  pool.reserve(size_t(nthreads));
  std::vector<Fiber> fibers(nthreads);
  for (int64_t i = 0; i < nthreads; ++i) fibers[i].stack = pool.get(size_t(i));

  // Every registered region (guarded allocations: every tensor this launch can touch) is
  // snapshotted, the grid runs once per schedule from the same bytes, and the results must agree.
  const auto regions = memory::registry().regions();
  std::vector<std::vector<unsigned char>> before, first;
  const int schedules = schedule_count();
  for (auto& r : regions) before.emplace_back(r.data, r.data + r.size);
  counters()[2].fetch_add(1, std::memory_order_relaxed);

  blockDim = block;
  gridDim = grid;
  std::string error;
  for (int s = 0; s < schedules && error.empty(); ++s) {
    if (s > 0)
      for (size_t i = 0; i < regions.size(); ++i) std::memcpy(regions[i].data, before[i].data(), regions[i].size);
    std::vector<int> border(size_t(std::min<int64_t>(nblocks, INT32_MAX)));
    order_for(s, -1, border);
    for (int bi : border) {
      blockIdx = uint3{unsigned(bi % grid.x), unsigned((bi / grid.x) % grid.y), unsigned(bi / (grid.x * grid.y))};
      Block b;
      b.fibers = &fibers;
      b.nthreads = int(nthreads);
      b.body = &body;
      b.stack_size = StackPool::kStack;
      current_block() = &b;
      error = run_block(b, s);
      current_block() = nullptr;
      for (auto& e : b.shared) std::free(e.second);
      if (!error.empty()) {
        error += " [schedule " + std::to_string(s) + "]";
        break;
      }
    }
    if (!error.empty()) break;
    if (s == 0) {
      for (auto& r : regions) first.emplace_back(r.data, r.data + r.size);
    } else {
      for (size_t i = 0; i < regions.size() && error.empty(); ++i) {
        const auto* a = first[i].data();
        const auto* c = regions[i].data;
        for (size_t k = 0; k < regions[i].size; ++k)
          if (a[k] != c[k]) {
            error = "the result depends on the schedule (a race, or a write into another thread's "
                    "memory): byte " + std::to_string(k) + " of a " + std::to_string(regions[i].size) +
                    "-byte buffer differs between schedule 0 and schedule " + std::to_string(s);
            break;
          }
      }
    }
  }
  if (error.empty()) error = memory::registry().check_guards();
  blockDim = dim3();
  gridDim = dim3();
  threadIdx = uint3{0, 0, 0};
  blockIdx = uint3{0, 0, 0};
  TORCH_CHECK(error.empty(), "simt: ", error);
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments converted to the kernel's
// parameter types (as a launch does) and copied into the launch.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto* k = kernel;
    const std::function<void()> body = [k, &params]() { std::apply(k, params); };
    run_grid(body, grid, block);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  TORCH_CHECK(smem == 0, "simt: dynamic shared memory is not emulated");
  return Launch<P...>{kernel, grid, block};
}

}  // namespace simt

// ---- the CUDA names the kernels use, one definition each --------------------------------------

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::syncthreads_at(file, line);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::shfl_xor_at(mask, var, lane_mask, width, file, line);
}

#define LSE_LAUNCH(kernel, grid, block, smem, stream) ::simt::launch((kernel), dim3(grid), dim3(block), (smem))
#define LSE_LAUNCH_CHECK() ((void)0)
#define LSE_SHARED(type, name, n)  \
  static const char name##_simt_tag = 0; \
  type* const name = ::simt::shared_array<type>(&name##_simt_tag, size_t(n))

namespace labelsmooth_ext {
namespace cuda {

using stream_t = int;
struct DeviceGuard {
  template <typename D>
  explicit DeviceGuard(const D&) {}
};
inline stream_t current_stream() { return 0; }
// A small emulated GPU: grid-stride loops get several blocks and several iterations each.
inline int sm_count(int) { return 2; }

// The L2-hinted 16-byte accesses of platform.cuh: plain accesses here (the hints only change
// which lines the GPU's L2 keeps), through vec_ptr's alignment check by their callers.
template <typename V>
inline V load_keep_l2(const V* p) { return *p; }
template <typename V>
inline V load_last_l2(const V* p) { return *p; }
template <typename V>
inline void store_stream(V* p, const V& v) { *p = v; }

// rcp_normal (platform.cuh: the hardware reciprocal and a Newton step on the GPU, within an
// ulp): the exact quotient here.
inline float rcp_normal(float x) { return 1.0f / x; }
inline double rcp_normal(double x) { return 1.0 / x; }

// ex2.approx.f32 on the GPU (relative error ~2^-22); the CPU's exp2f here.
inline float ex2_approx(float x) { return exp2f(x); }

template <typename V, typename T>
inline V* vec_ptr(T* p) {
  static_assert(alignof(V) == 16 && sizeof(V) == 16, "a 16-byte pack");
  simt::counters()[std::is_const_v<V> ? 0 : 1].fetch_add(1, std::memory_order_relaxed);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%p", static_cast<const void*>(p));
    simt::fail("misaligned 16-byte pack access at " + std::string(buf) + " (" +
               std::to_string(reinterpret_cast<uintptr_t>(p) % 16) + " bytes past 16-byte alignment) by " +
               simt::thread_name(simt::self()));
  }
  return reinterpret_cast<V*>(p);
}

// A piece of a pack (8 or 4 bytes) stored at p, checked for its own alignment.
template <typename T, typename V>
inline void store_piece(T* p, V v) {
  static_assert(sizeof(V) == 8 || sizeof(V) == 4, "a piece of a pack");
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V) != 0) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%p", static_cast<const void*>(p));
    simt::fail("misaligned " + std::to_string(sizeof(V)) + "-byte access at " + std::string(buf) + " by " +
               simt::thread_name(simt::self()));
  }
  std::memcpy(static_cast<void*>(p), &v, sizeof(V));
}

}  // namespace cuda
}  // namespace labelsmooth_ext
