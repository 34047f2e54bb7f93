// Guarded memory for the SIMT emulation: every buffer an emulated launch may touch is allocated
// here, with guard bytes before and after it (checked after every launch and when freed) and
// its contents 0xFF (NaN for every float type) until written. The launch also snapshots every
// live region to rerun the grid under another schedule from the same bytes.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define LSE_SIMT_MEM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LSE_SIMT_MEM_ASAN 1
#endif
#endif
#ifdef LSE_SIMT_MEM_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace simt {
namespace memory {

constexpr size_t kGuard = 64;  // keeps the user pointer 64-byte aligned
constexpr unsigned char kGuardByte = 0xA5;

struct Region {
  unsigned char* data;
  size_t size;
};

class Registry {
 public:
  void* allocate(size_t n) {
    const size_t total = (n + 2 * kGuard + 63) / 64 * 64;
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    if (!base) return nullptr;
    unsigned char* user = base + kGuard;
    std::memset(base, kGuardByte, kGuard);
    std::memset(user, 0xFF, n);
    std::memset(user + n, kGuardByte, total - kGuard - n);
    poison(user, n, true);  // under ASan any access to a guard, read or write, is an error
    std::lock_guard<std::mutex> lock(mutex_);
    live_[user] = n;
    return user;
  }

  // Frees p (which allocate returned); a broken guard is reported by the next check_guards.
  void release(void* p) {
    auto* user = static_cast<unsigned char*>(p);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(user);
      if (it == live_.end()) return;
      const size_t n = it->second;
      const std::string e = check_one(user, n);
      if (!e.empty() && pending_.empty()) pending_ = e + " (found when it was freed)";
      live_.erase(it);
      poison(user, n, false);
    }
    std::free(user - kGuard);
  }

  bool contains(const void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_.count(static_cast<unsigned char*>(const_cast<void*>(p))) != 0;
  }

  std::vector<Region> regions() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Region> r;
    for (auto& [p, n] : live_) r.push_back({p, n});
    return r;
  }

  // "" when every live region's guards are intact (and none was broken when freed).
  std::string check_guards() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string e;
    std::swap(e, pending_);
    for (auto& [p, n] : live_) {
      const std::string ei = check_one(p, n);
      if (!ei.empty()) repair(p, n);  // reported once
      if (e.empty()) e = ei;
    }
    return e;
  }

 private:
  static void poison(unsigned char* user, size_t n, bool on) {
#ifdef LSE_SIMT_MEM_ASAN
    const size_t total = (n + 2 * kGuard + 63) / 64 * 64;
    if (on) {
      ASAN_POISON_MEMORY_REGION(user - kGuard, kGuard);
      ASAN_POISON_MEMORY_REGION(user + n, total - kGuard - n);
    } else {
      ASAN_UNPOISON_MEMORY_REGION(user - kGuard, total);
    }
#else
    (void)user, (void)n, (void)on;
#endif
  }

  static void repair(unsigned char* user, size_t n) {
    const size_t total = (n + 2 * kGuard + 63) / 64 * 64;
    poison(user, n, false);
    std::memset(user - kGuard, kGuardByte, kGuard);
    std::memset(user + n, kGuardByte, total - kGuard - n);
    poison(user, n, true);
  }

  static std::string check_one(unsigned char* user, size_t n) {
    poison(user, n, false);
    const std::string e = check_bytes(user, n);
    poison(user, n, true);
    return e;
  }

  static std::string check_bytes(const unsigned char* user, size_t n) {
    const size_t total = (n + 2 * kGuard + 63) / 64 * 64;
    for (size_t i = 0; i < kGuard; ++i)
      if (user[-1 - int64_t(i)] != kGuardByte)
        return "out-of-bounds write " + std::to_string(i + 1) + " bytes before a " + std::to_string(n) +
               "-byte buffer";
    for (size_t i = n; i < total - kGuard; ++i)
      if (user[i] != kGuardByte)
        return "out-of-bounds write " + std::to_string(i - n) + " bytes past the end of a " +
               std::to_string(n) + "-byte buffer";
    return "";
  }

  std::mutex mutex_;
  std::map<unsigned char*, size_t> live_;
  std::string pending_;
};

inline Registry& registry() {
  static Registry r;
  return r;
}

// A guarded buffer of n elements (C++ tests).
template <typename T>
struct Buffer {
  T* p = nullptr;
  size_t n = 0;
  explicit Buffer(size_t count) : p(static_cast<T*>(registry().allocate(count * sizeof(T)))), n(count) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { registry().release(p); }
  T& operator[](size_t i) { return p[i]; }
};

}  // namespace memory
}  // namespace simt
