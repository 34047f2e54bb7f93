// Warp/block reductions and 16-byte vector packs for the CUDA kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "../row_math.h"
#include "platform.cuh"

namespace labelsmooth_ext {
namespace cuda {

// VEC elements of T in one 16-byte load/store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *vec_ptr<const Pack<T>>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  *vec_ptr<Pack<T>>(p) = x;
}

// With L2 hints (platform.cuh): read again soon / read for the last time / not read again.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack_keep(const T* p) {
  return load_keep_l2(vec_ptr<const Pack<T>>(p));
}
template <typename T>
__device__ __forceinline__ Pack<T> load_pack_last(const T* p) {
  return load_last_l2(vec_ptr<const Pack<T>>(p));
}
template <typename T>
__device__ __forceinline__ void store_pack_stream(T* p, const Pack<T>& x) {
  store_stream(vec_ptr<Pack<T>>(p), x);
}

// The largest power of two (at most 16) dividing p's address: how wide a store at p may be.
template <typename T>
__device__ __forceinline__ int address_alignment(const T* p) {
  const unsigned a = unsigned(reinterpret_cast<uintptr_t>(p) & 15u);
  return a == 0 ? 16 : int(a & (0u - a));
}

// A 16-byte pack stored at an address aligned to only `align` bytes (8, 4 or 2; the element
// size at least): two 8-byte, four 4-byte or eight 2-byte stores (a gradient row aligned
// differently from the input row its packs follow).
template <typename T>
__device__ __forceinline__ void store_pack_split(T* p, const Pack<T>& x, int align) {
  if (align >= 8) {
    uint64_t w[2];
    memcpy(w, x.v, 16);
    store_piece(p, w[0]);
    store_piece(p + 8 / sizeof(T), w[1]);
  } else if (align >= 4 || sizeof(T) >= 4) {
    uint32_t w[4];
    memcpy(w, x.v, 16);
#pragma unroll
    for (int i = 0; i < 4; ++i) store_piece(p + i * 4 / sizeof(T), w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < Pack<T>::kSize; ++i) p[i] = x.v[i];
  }
}

// exp(x) for the kernels: float uses the hardware ex2 (relative error ~2^-22), double the
// full-precision exp. exp(-inf) = 0, exp(NaN) = NaN.
__device__ __forceinline__ float fast_exp(float x) {
  return ex2_approx(x * 1.4426950408889634f);
}
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Per-thread partial state of a row: running max / rescaled sum of exp, and the linear sums
// T = sum (z - ref), Tw = sum w (z - ref) around a per-row reference value.
template <typename acc_t>
struct RowState {
  acc_t m, s, T, Tw;
};

template <typename acc_t>
__device__ __forceinline__ void merge(RowState<acc_t>& a, const RowState<acc_t>& b) {
  lse_merge(a.m, a.s, b.m, b.s);
  a.T += b.T;
  a.Tw += b.Tw;
}

template <typename acc_t, int WIDTH>
__device__ __forceinline__ RowState<acc_t> warp_reduce(RowState<acc_t> st) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
    RowState<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off, WIDTH);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off, WIDTH);
    o.T = __shfl_xor_sync(0xffffffffu, st.T, off, WIDTH);
    o.Tw = __shfl_xor_sync(0xffffffffu, st.Tw, off, WIDTH);
    merge(st, o);
  }
  return st;
}

// Reduces over the ROW_THREADS threads of a row (threadIdx.x) and returns the result to all
// of them. ROW_THREADS <= 32: one warp (or part of one) per row, no shared memory.
// ROW_THREADS > 32: one row per block.
template <typename acc_t, int ROW_THREADS>
__device__ __forceinline__ RowState<acc_t> row_reduce(RowState<acc_t> st) {
  if constexpr (ROW_THREADS <= 32) {
    return warp_reduce<acc_t, ROW_THREADS>(st);
  } else {
    constexpr int kWarps = ROW_THREADS / 32;
    LSE_SHARED(RowState<acc_t>, partial, kWarps);
    st = warp_reduce<acc_t, 32>(st);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    st = partial[lane < kWarps ? lane : 0];
    if (lane >= kWarps) st = RowState<acc_t>{acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0)};
    st = warp_reduce<acc_t, 32>(st);
    return st;
  }
}

}  // namespace cuda
}  // namespace labelsmooth_ext
