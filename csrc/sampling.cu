// Temperature, top-k and top-p sampling over [batch, vocab] float32 logits without a sort: three kernels.
//
// Every scaled logit z = logit * (1 / temperature) maps to an order-preserving uint32 key, so "the k-th largest
// value" and "the value where the probability mass from the top reaches top_p" are radix selects: four passes of
// 8-bit digits, each a 256-bin shared-memory histogram of counts or of probability mass. Mass is fixed point
// (2^40 = the row maximum's weight) and summed in integers, so it is exact and order-free: the kept set is a
// deterministic function of the logits, whichever path found it. The kept set is always {key >= tau}.
//
// 1. chunk_kernel, grid (chunks, batch), 2048 logits per block, so that even batch 1 spreads over ~75 SMs: the
//    chunk's argmax, its softmax sum, and its candidates, every element above the chunk's cap-th largest key thr
//    (fewer than cap of them).
// 2. row_kernel, one block per row: the row max from the chunk summaries, then the top-k and top-p thresholds
//    over S = the candidates above G = max(thr) of the row, staged in shared memory. Every element of the row
//    above G is in S, so S decides exactly whenever the kept set lies above G. When it does not (ties at the top,
//    a large top_k, top_p of a flat distribution) or S does not fit, the same selects run over the full row:
//    correct, on one SM, slower.
// 3. draw_kernel, grid (chunks, batch): the kept mask, and the draw as an exponential race: the kept token with
//    the largest z + Gumbel noise wins (Gumbel-max), each block's leader is merged by a 64-bit atomicMax and the
//    row's last block writes the token. Noise is Philox, counter-based: no random tensor, no generator state.
//
// No host sync and no data-dependent allocation (scratch is sized from shapes): capturable in a CUDA graph.

#include "sampling.h"

#include <algorithm>

namespace tandem {
namespace {

constexpr int kChunkThreads = 256;
constexpr int kItems = 8;
constexpr int kChunk = kChunkThreads * kItems;  // logits per chunk_kernel / draw_kernel block
constexpr int kRowThreads = 1024;
constexpr int kMinCap = 64;    // candidates per chunk, or top_k + 1 where that is more
constexpr int kStaged = 8192;  // candidate keys row_kernel holds in shared memory (32 KiB)
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr float kOne = 1099511627776.0f;  // 2^40: the fixed-point weight of the row maximum; vocab < 2^24 fits

enum Flags { kGreedy = 1, kNeedSum = 2, kNeedCands = 4, kFullRow = 8 };

struct ChunkInfo {
  unsigned long long best;  // pack(key, index) of the chunk's maximum
  float sum;                // sum of exp(z - the chunk's max z)
  uint32_t thr;             // every element of the chunk with key > thr is among its candidates
};

struct RowInfo {
  unsigned long long best;  // the race's leader so far: pack(score key, index)
  uint32_t tau;             // the kept set: key >= tau
  uint32_t arg;             // the argmax (the greedy token)
  uint32_t done;            // draw_kernel blocks finished
};

struct Select {
  unsigned long long bins[256];
  unsigned long long above;
  uint32_t digit;
};

// Order-preserving: a < b as floats <=> float_key(a) < float_key(b). -0 and +0 tie (they compare equal) and NaN
// is above everything, as in torch.argmax. No float maps to 0, which therefore marks "no element".
__device__ __forceinline__ uint32_t float_key(float z) {
  if (isnan(z)) return 0xFFFFFFFFu;
  const uint32_t u = __float_as_uint(z == 0.0f ? 0.0f : z);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

// The larger of two packs has the larger key, then the lower index (torch.argmax's tie rule).
__device__ __forceinline__ unsigned long long pack(uint32_t key, uint32_t index) {
  return (unsigned long long)key << 32 | (0xFFFFFFFFu - index);
}

__device__ __forceinline__ uint32_t unpack_index(unsigned long long p) { return 0xFFFFFFFFu - (uint32_t)p; }

// Philox4x32-10 (Salmon et al., SC'11), the generator of curand and of torch's at::philox_engine.
__device__ __forceinline__ uint4 philox(uint4 c, uint2 k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round) k = make_uint2(k.x + 0x9E3779B9u, k.y + 0xBB67AE85u);
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }
  return c;
}

// z + Gumbel noise. The counter layout is at::philox_engine(seed, subsequence = row * vocab + index, offset)'s.
// E = -log(1 - v) is Exp(1); -log(E) is Gumbel. log1p keeps E exact where it is small: the winners' side.
__device__ __forceinline__ float race_score(float z, uint64_t seed, uint64_t offset, uint64_t sub) {
  const uint4 r = philox(make_uint4((uint32_t)offset, (uint32_t)(offset >> 32), (uint32_t)sub, (uint32_t)(sub >> 32)),
                         make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)));
  const float v = ((float)r.x + 0.5f) * 2.3283064365386963e-10f;  // (0, 1]; v == 1 gives E = inf: never wins
  return z - logf(-log1pf(-v));
}

struct Max {
  template <class T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Sum {
  template <class T> __device__ T operator()(T a, T b) const { return a + b; }
};

// Every thread gets the block's reduction. Fixed order, so float sums are deterministic too.
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T part[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();  // a previous reduction may still be reading part
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  v = part[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) v = op(v, part[w]);
  return v;
}

// bins[bin] += w for the active lanes. Every lane of the warp must call it. Lanes with the same bin add once (their
// count or their sum): most of a row shares a key's top byte, and lanes hitting one shared address serialize.
template <bool kCount>
__device__ __forceinline__ void hist_add(unsigned long long* bins, uint32_t bin, unsigned long long w, bool active) {
  const uint32_t b = active ? bin : 256u;
  const unsigned peers = __match_any_sync(kFull, b);
  unsigned long long sum;
  if constexpr (kCount) {
    sum = __popc(peers);
  } else {  // w <= 2^40, so each 32-bit half-sum of 32 lanes fits
    sum = ((unsigned long long)__reduce_add_sync(peers, (uint32_t)(w >> 24)) << 24) +
          __reduce_add_sync(peers, (uint32_t)(w & 0xFFFFFFu));
  }
  if (active && (threadIdx.x & 31) == (unsigned)(__ffs(peers) - 1)) atomicAdd(&bins[b], sum);
}

// Warp 0: the digit d where the weight from the top crosses rem, weight(bins > d) < rem <= weight(bins >= d), with
// rem clamped to [1, total] (too large a target selects the lowest nonempty bin). Lane l owns bins 8l .. 8l + 7.
__device__ void pick_digit(Select& s, unsigned long long rem) {
  const unsigned lane = threadIdx.x;
  unsigned long long own[8], mine = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    own[j] = s.bins[lane * 8 + j];
    mine += own[j];
  }
  unsigned long long from = mine;  // weight in lanes >= lane
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long v = __shfl_down_sync(kFull, from, o);
    if (lane + o < 32) from += v;
  }
  const unsigned long long total = __shfl_sync(kFull, from, 0);
  if (total == 0) {  // no active item (cannot happen for a nonempty row): any digit
    if (lane == 0) {
      s.digit = 0;
      s.above = 0;
    }
    return;
  }
  rem = rem < 1 ? 1 : rem > total ? total : rem;
  unsigned long long run = from - mine;  // weight in the bins of higher lanes
#pragma unroll
  for (int j = 7; j >= 0; --j) {
    if (run < rem && run + own[j] >= rem) {
      s.digit = lane * 8 + j;
      s.above = run;
    }
    run += own[j];
  }
}

// The key t among the active items with weight(key > t) < target <= weight(key >= t): with unit weights (kCount)
// the target-th largest key; with probability mass the key where the mass from the top reaches target. Too large
// a target gives the smallest key. visit(f) calls f(key, weight, active) for each of the calling thread's items,
// the same number of times in every lane of a warp. Every thread of the block must call it.
template <bool kCount, class Visit>
__device__ uint32_t radix_select(Visit visit, unsigned long long target, Select& s) {
  uint32_t prefix = 0;
  unsigned long long above = 0;  // weight of the items above the prefix's range
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8);  // the digits chosen so far
    __syncthreads();  // the previous pass, or the caller, is done with s
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s.bins[i] = 0;
    __syncthreads();
    visit([&](uint32_t key, unsigned long long w, bool active) {
      hist_add<kCount>(s.bins, (key >> shift) & 0xFFu, w, active && (key & high) == prefix);
    });
    __syncthreads();
    if (threadIdx.x < 32) pick_digit(s, target - above);
    __syncthreads();
    prefix |= s.digit << shift;
    above += s.above;
  }
  return prefix;
}

__global__ void __launch_bounds__(kChunkThreads)
chunk_kernel(const float* __restrict__ logits, int vocab, float inv_t, int flags, int cap, ChunkInfo* __restrict__ info,
             unsigned long long* __restrict__ cands) {
  __shared__ Select sel;
  __shared__ int count;
  const int row = blockIdx.y, base = blockIdx.x * kChunk;
  const size_t chunk = (size_t)row * gridDim.x + blockIdx.x;
  const float* x = logits + (size_t)row * vocab;
  uint32_t keys[kItems];
  unsigned long long best = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = base + j * kChunkThreads + threadIdx.x;
    keys[j] = i < vocab ? float_key(__fmul_rn(x[i], inv_t)) : 0u;  // __fmul_rn: never fused, as in every kernel
    if (keys[j]) best = max(best, pack(keys[j], i));
  }
  best = block_reduce(best, Max());
  float sum = 0.0f;
  if (flags & kNeedSum) {
    const float zmax = key_float(best >> 32);
    if (zmax > -INFINITY) {  // a chunk of masked (-inf) logits has no mass; exp(-inf - -inf) would be NaN
#pragma unroll
      for (int j = 0; j < kItems; ++j)
        if (keys[j]) sum += expf(key_float(keys[j]) - zmax);
    }
    sum = block_reduce(sum, Sum());
  }
  uint32_t thr = 0;  // a chunk no larger than cap keeps everything
  if (flags & kNeedCands) {
    if (min(kChunk, vocab - base) > cap) {
      thr = radix_select<true>(
          [&](auto f) {
#pragma unroll
            for (int j = 0; j < kItems; ++j) f(keys[j], 1ull, keys[j] != 0u);
          },
          cap, sel);
    }
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    unsigned long long* slots = cands + chunk * cap;
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      if (keys[j] > thr) slots[atomicAdd(&count, 1)] = pack(keys[j], base + j * kChunkThreads + threadIdx.x);
    __syncthreads();
    for (int s = count + threadIdx.x; s < cap; s += kChunkThreads) slots[s] = 0;  // key 0: empty
  }
  if (threadIdx.x == 0) info[chunk] = ChunkInfo{best, sum, thr};
}

__global__ void __launch_bounds__(kRowThreads)
row_kernel(const float* __restrict__ logits, int vocab, float inv_t, int top_k, double top_p, int flags, int cap,
           int chunks, const ChunkInfo* __restrict__ info, const unsigned long long* __restrict__ cands,
           RowInfo* __restrict__ rows, int64_t* __restrict__ tokens) {
  __shared__ Select sel;
  __shared__ uint32_t staged[kStaged];
  __shared__ int n_staged;
  const int row = blockIdx.x;
  const ChunkInfo* ci = info + (size_t)row * chunks;
  unsigned long long best = 0;
  uint32_t thr = 0;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    best = max(best, ci[c].best);
    thr = max(thr, ci[c].thr);
  }
  best = block_reduce(best, Max());
  const uint32_t arg = unpack_index(best);
  uint32_t tau = 1;  // keeps every element
  if (!(flags & kGreedy) && (top_k || top_p < 1.0)) {
    const float m = key_float(best >> 32);
    thr = block_reduce(thr, Max());
    if (threadIdx.x == 0) n_staged = 0;
    __syncthreads();
    bool full = flags & kFullRow;
    if (!full) {  // S: the candidates above thr, which are exactly the row's elements above thr
      const unsigned long long* slots = cands + (size_t)row * chunks * cap;
      for (int s = threadIdx.x; s < chunks * cap; s += blockDim.x) {
        const uint32_t key = slots[s] >> 32;
        if (key > thr) {
          const int at = atomicAdd(&n_staged, 1);
          if (at < kStaged) staged[at] = key;
        }
      }
    }
    __syncthreads();
    const int n = n_staged;
    full = full || n > kStaged || n < top_k;  // S must hold the k largest
    const float* x = logits + (size_t)row * vocab;
    auto items = [&](auto f) {  // f(key, z, active) over S, or over the full row
      if (full) {
        for (int b = 0; b < vocab; b += blockDim.x) {
          const int i = b + threadIdx.x;
          const float z = i < vocab ? __fmul_rn(x[i], inv_t) : 0.0f;
          f(float_key(z), z, i < vocab);
        }
      } else {
        for (int b = 0; b < n; b += blockDim.x) {
          const int s = b + threadIdx.x;
          const uint32_t key = s < n ? staged[s] : 0u;
          f(key, key_float(key), s < n);
        }
      }
    };
    auto weight = [&](float z) { return (unsigned long long)(expf(z - m) * kOne); };
    if (top_k) {
      tau = radix_select<true>(
          [&](auto g) { items([&](uint32_t key, float, bool active) { g(key, 1ull, active); }); }, top_k, sel);
    }
    if (top_p < 1.0) {
      const uint32_t kth = tau;  // the top-k threshold
      double total;  // the softmax denominator of the top-k kept set, in fixed point
      if (top_k) {
        unsigned long long w = 0;
        items([&](uint32_t key, float z, bool active) { w += active && key >= kth ? weight(z) : 0ull; });
        total = (double)block_reduce(w, Sum());
      } else {  // the whole row's, from the chunk sums
        float w = 0.0f;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x)
          if (ci[c].sum > 0.0f) w += ci[c].sum * expf(key_float(ci[c].best >> 32) - m);  // masked chunks add nothing
        total = (double)block_reduce(w, Sum()) * kOne;
      }
      const unsigned long long target = (unsigned long long)ceil(top_p * total);
      if (!full && !top_k) {  // S must hold the top_p mass
        unsigned long long w = 0;
        items([&](uint32_t, float z, bool active) { w += active ? weight(z) : 0ull; });
        full = block_reduce(w, Sum()) < target;
      }
      tau = radix_select<false>(
          [&](auto g) {
            items([&](uint32_t key, float z, bool active) {
              active = active && key >= kth;
              g(key, active ? weight(z) : 0ull, active);
            });
          },
          target, sel);
    }
  }
  if (threadIdx.x == 0) {
    rows[row] = RowInfo{0ull, tau, arg, 0u};
    if ((flags & kGreedy) && tokens) tokens[row] = arg;
  }
}

__global__ void __launch_bounds__(kChunkThreads)
draw_kernel(const float* __restrict__ logits, int vocab, float inv_t, int flags, uint64_t seed, uint64_t offset,
            RowInfo* __restrict__ rows, int64_t* __restrict__ tokens, bool* __restrict__ kept) {
  const int row = blockIdx.y, base = blockIdx.x * kChunk;
  const float* x = logits + (size_t)row * vocab;
  RowInfo& r = rows[row];
  const uint32_t tau = r.tau, arg = r.arg;
  const bool greedy = flags & kGreedy, race = tokens && !greedy;  // greedy tokens come from row_kernel
  unsigned long long best = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = base + j * kChunkThreads + threadIdx.x;
    if (i >= vocab) continue;
    const float z = __fmul_rn(x[i], inv_t);
    const bool keep = greedy ? (uint32_t)i == arg : float_key(z) >= tau;
    if (kept) kept[(size_t)row * vocab + i] = keep;
    if (race && keep) best = max(best, pack(float_key(race_score(z, seed, offset, (uint64_t)row * vocab + i)), i));
  }
  if (!race) return;
  best = block_reduce(best, Max());
  if (threadIdx.x == 0) {
    atomicMax(&r.best, best);
    __threadfence();  // the max lands before this block counts as done
    if (atomicAdd(&r.done, 1u) == gridDim.x - 1) tokens[row] = unpack_index(atomicMax(&r.best, 0ull));
  }
}

// From top_k + 1 = kChunk on, a chunk's cap-th largest key would leave nothing out: every element would be a
// candidate, so such a top_k goes straight to the full-row path, with no candidate scratch.
bool candidates_help(int vocab, int top_k) { return top_k <= 0 || top_k >= vocab || top_k + 1 < kChunk; }

int candidate_cap(int vocab, int top_k) {
  if (!candidates_help(vocab, top_k)) return 0;
  return top_k > 0 && top_k < vocab ? std::max(kMinCap, top_k + 1) : kMinCap;
}

}  // namespace

size_t sample_scratch_bytes(int batch, int vocab, int top_k) {
  const size_t chunks = (vocab + kChunk - 1) / kChunk;
  const size_t cands = chunks * candidate_cap(vocab, top_k) * sizeof(uint64_t);
  return batch * (chunks * sizeof(ChunkInfo) + sizeof(RowInfo) + cands);
}

cudaError_t sample_launch(const float* logits, int batch, int vocab, float temperature, int top_k, double top_p,
                          uint64_t seed, uint64_t offset, bool full_row, int64_t* tokens, bool* kept, void* scratch,
                          cudaStream_t stream) {
  if (top_k >= vocab) top_k = 0;  // keeps everything, as in the torch sampler
  if (!candidates_help(vocab, top_k)) full_row = true;
  const bool greedy = temperature == 0.0f;
  const bool filter = !greedy && (top_k > 0 || top_p < 1.0);
  // 1 / temperature, then a multiply: what torch's CUDA division by a Python float computes, so keys match its z.
  const float inv_t = greedy ? 1.0f : 1.0f / temperature;
  int flags = (greedy ? kGreedy : 0) | (full_row ? kFullRow : 0);
  if (filter && !full_row) flags |= kNeedCands;
  if (filter && top_k == 0) flags |= kNeedSum;
  const int chunks = (vocab + kChunk - 1) / kChunk, cap = candidate_cap(vocab, top_k);
  auto* info = static_cast<ChunkInfo*>(scratch);
  auto* rows = reinterpret_cast<RowInfo*>(info + (size_t)batch * chunks);
  auto* cands = reinterpret_cast<unsigned long long*>(rows + batch);
  const dim3 grid(chunks, batch);
  chunk_kernel<<<grid, kChunkThreads, 0, stream>>>(logits, vocab, inv_t, flags, cap, info, cands);
  row_kernel<<<batch, kRowThreads, 0, stream>>>(logits, vocab, inv_t, top_k, top_p, flags, cap, chunks, info, cands,
                                                 rows, tokens);
  if (kept || (tokens && !greedy))
    draw_kernel<<<grid, kChunkThreads, 0, stream>>>(logits, vocab, inv_t, flags, seed, offset, rows, tokens, kept);
  return cudaGetLastError();
}

}  // namespace tandem
