// Self-test of the CUDA host emulation (csrc/cuda/emulation/host_cuda.h), driven by
// tests/test_host_emulation.py. Usage: selftest <case>; prints "PASS <case> ..." or "FAIL <case> ..."
// (or, for the cases whose outcome the pytest judges, the measured result). Exit status 0 unless the
// program itself broke.
#include "async_copy.h"
#include "device.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

using longformer::cuda::dynamic_shared_memory;

namespace {

constexpr int TILE = 16;

// C[M,N] = A[M,K] B[K,N] with 16x16 tiles in static shared memory; K a multiple of 16.
// `barriers` = 2 is correct; 1 leaves out the barrier between loading a tile and using it.
template <int barriers>
__global__ void tiled_matmul(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c, int m,
                             int n, int k) {
  __shared__ float as[TILE][TILE];
  __shared__ __align__(16) float bs[TILE][TILE];
  const int row = blockIdx.y * TILE + threadIdx.y, col = blockIdx.x * TILE + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < k; k0 += TILE) {
    as[threadIdx.y][threadIdx.x] = row < m ? a[row * k + k0 + threadIdx.x] : 0.f;
    bs[threadIdx.y][threadIdx.x] = col < n ? b[(k0 + threadIdx.y) * n + col] : 0.f;
    if constexpr (barriers == 2) __syncthreads();
    for (int i = 0; i < TILE; ++i) acc += as[threadIdx.y][i] * bs[i][threadIdx.x];
    __syncthreads();
  }
  if (row < m && col < n) c[row * n + col] = acc;
}

double max_matmul_error(bool with_barrier, int size, double* seconds = nullptr) {
  const int m = size, n = size, k = size;
  std::vector<float> a(size_t(m) * k), b(size_t(k) * n), c(size_t(m) * n, -1.f);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(int(i * 7 % 13) - 6) / 8;
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(int(i * 5 % 11) - 5) / 4;
  const dim3 grid((n + TILE - 1) / TILE, (m + TILE - 1) / TILE), block(TILE, TILE);
  auto t0 = std::chrono::steady_clock::now();
  int rc = with_barrier ? LONGFORMER_LAUNCH(tiled_matmul<2>, grid, block, 0, nullptr, a.data(), b.data(), c.data(), m, n, k)
                        : LONGFORMER_LAUNCH(tiled_matmul<1>, grid, block, 0, nullptr, a.data(), b.data(), c.data(), m, n, k);
  if (seconds) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rc != 0) return 1e30;
  double err = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0;  // products of small dyadic fractions: exact in float and double
      for (int l = 0; l < k; ++l) ref += double(a[size_t(i) * k + l]) * b[size_t(l) * n + j];
      err = std::max(err, std::abs(ref - c[size_t(i) * n + j]));
    }
  return err;
}

// Each thread writes its slot and reads its left neighbour's, with the barrier left out: correct
// only if the neighbour happens to run first, which forward order does and the others don't.
__global__ void neighbour_without_barrier(int* out) {
  __shared__ int slot[256];
  slot[threadIdx.x] = int(threadIdx.x) * 3;
  out[threadIdx.x] = threadIdx.x == 0 ? 0 : slot[threadIdx.x - 1];  // missing __syncthreads() above
  __syncthreads();
}

// Warp collectives over a 2-D block (64 x 2): lanes follow the linear thread index.
__global__ void warp_collectives(int* ok) {
  const int t = threadIdx.x + threadIdx.y * blockDim.x, lane = t % 32, warp = t / 32;
  bool good = true;
  float f = float(t);
  for (int o = 16; o > 0; o /= 2) f += __shfl_xor_sync(0xffffffffu, f, o);
  good &= f == float(32 * (warp * 32) + 496);  // every lane holds the warp's sum
  double d = double(lane) + 0.5;
  for (int o = 16; o > 0; o /= 2) d += __shfl_down_sync(0xffffffffu, d, o);
  if (lane == 0) good &= d == 496 + 16.0;
  int64_t big = (int64_t(1) << 40) + lane;
  good &= __shfl_sync(0xffffffffu, big, 31 - lane) == (int64_t(1) << 40) + 31 - lane;
  uint32_t u = uint32_t(lane) * 2u;
  good &= __shfl_sync(0xffffffffu, u, 3, 8) == uint32_t((lane & ~7) + 3) * 2u;  // width 8 segments
  // Partner in a later segment of `width` lanes: own value; in an earlier one: its value (CUDA rule).
  good &= __shfl_xor_sync(0xffffffffu, lane, 8, 8) == ((lane & 8) ? lane - 8 : lane);
  int scan = lane;  // inclusive prefix sum with __shfl_up_sync
  for (int o = 1; o < 32; o *= 2) {
    int v = __shfl_up_sync(0xffffffffu, scan, o);
    if (lane >= o) scan += v;
  }
  good &= scan == lane * (lane + 1) / 2;
  good &= __ballot_sync(0xffffffffu, lane % 3 == 0) == 0x49249249u;
  good &= __any_sync(0xffffffffu, lane == 17 && warp == 1) == (warp == 1);
  good &= __all_sync(0xffffffffu, lane < 32) && !__all_sync(0xffffffffu, lane < 31);
  __half h = __shfl_down_sync(0xffffffffu, __float2half_rn(float(lane)), 1);
  good &= __half2float(h) == float(lane == 31 ? 31 : lane + 1);
  __syncwarp();
  ok[blockIdx.x * 128 + t] = good;
}

__global__ void atomics(int* count, float* fsum, double* dsum, unsigned long long* usum, unsigned* blocks_seen,
                        std::thread::id* worker_of_block) {
  atomicAdd(count, 1);
  atomicAdd(fsum, 1.0f);
  atomicAdd(dsum, 0.5);
  atomicAdd(usum, 3ull);
  if (threadIdx.x == 0) {
    atomicAdd(blocks_seen, 1u);
    worker_of_block[blockIdx.x] = std::this_thread::get_id();  // not CUDA: which OS thread ran the block
  }
}

// Reads the dynamic shared buffer before writing (expects the 0xFF fill), then a reversal through it.
__global__ void dynamic_shared(float* out, int* ok) {
  float* buf = dynamic_shared_memory<float>();
  const int t = threadIdx.x, n = blockDim.x;
  bool good = (reinterpret_cast<uintptr_t>(buf) % 16 == 0) && __float_as_uint(buf[t]) == 0xffffffffu;
  __syncthreads();
  buf[t] = float(blockIdx.x * 1000 + t);
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
  ok[blockIdx.x * n + t] = good;
}

__global__ void coordinates(int* hits) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  atomicAdd(&hits[bid * (blockDim.x * blockDim.y * blockDim.z) + tid], 1);
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x >= 100) return;  // threads 100.. exit; the rest wait forever
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_shuffle(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half a warp
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void partial_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0); }

__global__ void no_arguments() {}

// Blocks 7 and 30 (of 40, spread over two OS threads) fail; the launch must always name block 7.
__global__ void fails_in_two_blocks(int* out) {
  if ((blockIdx.x == 7 || blockIdx.x == 30) && threadIdx.x == 5) return;
  __syncthreads();
  out[blockIdx.x] = 1;
}

// 1024 fibers, each with a 128-float array kept live across barriers (the "registers" of a kernel).
__global__ void big_block(float* out) {
  float regs[128];
  for (int i = 0; i < 128; ++i) regs[i] = float(threadIdx.x + i);
  __shared__ float partial[1024];
  for (int round = 0; round < 3; ++round) {
    float s = 0;
    for (int i = 0; i < 128; ++i) s += regs[i];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int i = 0; i < 128; ++i) regs[i] += partial[(threadIdx.x + 1) % 1024] * 0.f + 1.f;
    __syncthreads();
  }
  out[threadIdx.x] = regs[127];
}

// A two-stage cp.async pipeline over tiles of 256 floats (64 threads, one 16-byte copy each per
// tile); each thread adds up one element per tile that another thread copied. kVariant 0 is
// correct; 1 leaves out the wait, 2 waits too weakly (wait_group 2: the tile it reads may still be
// in flight), 3 leaves out the barrier between the wait and reading other threads' copies.
enum AsyncVariant { kAsyncCorrect, kAsyncNoWait, kAsyncWeakWait, kAsyncNoBarrier };
constexpr int kAsyncTile = 256;

template <int kVariant>
__global__ void async_pipeline(const float* __restrict__ in, float* __restrict__ out, int tiles) {
  float* stage = dynamic_shared_memory<float>();  // [2][kAsyncTile]
  const int tid = threadIdx.x;
  auto issue = [&](int t) {
    if (t < tiles) longformer::cuda::cp_async_16(stage + (t & 1) * kAsyncTile + 4 * tid, in + t * kAsyncTile + 4 * tid, true);
    longformer::cuda::cp_async_commit();  // an empty group past the end keeps the counting uniform
  };
  float acc = 0.f;
  issue(0);
  for (int t = 0; t < tiles; ++t) {
    issue(t + 1);
    if constexpr (kVariant == kAsyncWeakWait) longformer::cuda::cp_async_wait<2>();
    if constexpr (kVariant != kAsyncNoWait && kVariant != kAsyncWeakWait) longformer::cuda::cp_async_wait<1>();
    if constexpr (kVariant != kAsyncNoBarrier) __syncthreads();
    acc += stage[(t & 1) * kAsyncTile + (4 * tid + 7) % kAsyncTile];  // copied by thread tid + 1
    __syncthreads();  // the next issue overwrites this stage
  }
  out[blockIdx.x * blockDim.x + tid] = acc;
}

// Elements of `out` that differ from the exact sums (small integers: exact in float).
template <int kVariant>
int async_pipeline_wrong() {
  const int blocks = 3, threads = 64, tiles = 5;
  std::vector<float> in(size_t(blocks) * tiles * kAsyncTile), out(size_t(blocks) * threads, -1.f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(int(i % 17) - 8);
  // Every block reads the same tiles (offset per block would need a larger input; the sums differ
  // per thread, which is what the check needs).
  int rc = LONGFORMER_LAUNCH(async_pipeline<kVariant>, blocks, threads, 2 * kAsyncTile * sizeof(float), nullptr,
                             in.data(), out.data(), tiles);
  if (rc != 0) return -1;
  int wrong = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) {
      float expected = 0.f;
      for (int k = 0; k < tiles; ++k) expected += in[size_t(k) * kAsyncTile + (4 * t + 7) % kAsyncTile];
      wrong += !(out[size_t(b) * threads + t] == expected);
    }
  return wrong;
}

int report(const std::string& name, bool pass, const std::string& detail = "") {
  std::printf("%s %s %s\n", pass ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  return 0;
}

// Runs `launch` expecting std::runtime_error; prints its message.
template <typename F>
int expect_error(const std::string& name, F launch) {
  try {
    launch();
  } catch (const std::runtime_error& e) {
    std::printf("ERROR %s %s\n", name.c_str(), e.what());
    return 0;
  }
  std::printf("NOERROR %s\n", name.c_str());
  return 0;
}

// Converts the uint32 values in file `in` (kind: f2h, h2f, f2b, b2f) and writes uint32 results to `out`.
int conversions(const std::string& kind, const char* in, const char* out) {
  std::FILE* f = std::fopen(in, "rb");
  if (!f) return 2;
  std::vector<uint32_t> v;
  for (uint32_t x; std::fread(&x, sizeof x, 1, f) == 1;) v.push_back(x);
  std::fclose(f);
  for (uint32_t& x : v) {
    if (kind == "f2h") x = __half_as_ushort(__float2half_rn(__uint_as_float(x)));
    else if (kind == "h2f") x = __float_as_uint(__half2float(__ushort_as_half((unsigned short)x)));
    else if (kind == "f2b") x = __bfloat16_as_ushort(__float2bfloat16_rn(__uint_as_float(x)));
    else if (kind == "b2f") x = __float_as_uint(__bfloat162float(__ushort_as_bfloat16((unsigned short)x)));
    else return 2;
  }
  f = std::fopen(out, "wb");
  if (!f || std::fwrite(v.data(), sizeof(uint32_t), v.size(), f) != v.size()) return 2;
  std::fclose(f);
  std::printf("CONVERTED %zu\n", v.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if (what == "matmul") {
    double seconds = 0;
    const int size = argc > 2 ? std::atoi(argv[2]) : 256;
    const double e1 = max_matmul_error(true, 48), e2 = max_matmul_error(true, size, &seconds);
    return report(what, e1 == 0 && e2 == 0, "err48=" + std::to_string(e1) + " err=" + std::to_string(e2) +
                                               " size=" + std::to_string(size) + " seconds=" + std::to_string(seconds));
  }
  if (what == "async_copy") {
    const int wrong = async_pipeline_wrong<kAsyncCorrect>();
    return report(what, wrong == 0, "wrong=" + std::to_string(wrong));
  }
  if (what == "async_copy_no_wait" || what == "async_copy_weak_wait" || what == "async_copy_no_barrier") {
    const int wrong = what == "async_copy_no_wait"     ? async_pipeline_wrong<kAsyncNoWait>()
                      : what == "async_copy_weak_wait" ? async_pipeline_wrong<kAsyncWeakWait>()
                                                        : async_pipeline_wrong<kAsyncNoBarrier>();
    std::printf("RESULT %s wrong=%d\n", what.c_str(), wrong);
    return 0;
  }
  if (what == "matmul_missing_barrier") {
    std::printf("RESULT %s max_error=%g\n", what.c_str(), max_matmul_error(false, 64));
    return 0;
  }
  if (what == "neighbour_missing_barrier") {
    std::vector<int> out(256, -1);
    int rc = LONGFORMER_LAUNCH(neighbour_without_barrier, 1, 256, 0, nullptr, out.data());
    int wrong = 0;
    for (int t = 1; t < 256; ++t) wrong += out[size_t(t)] != (t - 1) * 3;
    std::printf("RESULT %s rc=%d wrong=%d\n", what.c_str(), rc, wrong);
    return 0;
  }
  if (what == "warp") {
    std::vector<int> ok(128 * 3, 0);
    int rc = LONGFORMER_LAUNCH(warp_collectives, 1, dim3(64, 2), 0, nullptr, ok.data());
    rc |= LONGFORMER_LAUNCH(warp_collectives, 2, dim3(64, 2), 0, nullptr, ok.data() + 128);
    int good = 0;
    for (int v : ok) good += v;
    return report(what, rc == 0 && good == 128 * 3, "good_lanes=" + std::to_string(good));
  }
  if (what == "atomics") {
    const int blocks = 64, threads = 256;
    int count = 0;
    float fsum = 0;
    double dsum = 0;
    unsigned long long usum = 0;
    unsigned seen = 0;
    std::vector<std::thread::id> worker(blocks);
    int rc = LONGFORMER_LAUNCH(atomics, blocks, threads, 0, nullptr, &count, &fsum, &dsum, &usum, &seen, worker.data());
    const int n = blocks * threads;
    const size_t os_threads = std::set<std::thread::id>(worker.begin(), worker.end()).size();
    return report(what, rc == 0 && count == n && fsum == float(n) && dsum == n * 0.5 && usum == 3ull * n &&
                            seen == unsigned(blocks) && os_threads == 2,
                  "count=" + std::to_string(count) + " os_threads=" + std::to_string(os_threads));
  }
  if (what == "dynamic_shared") {
    const int blocks = 5, n = 96;
    std::vector<float> out(blocks * n);
    std::vector<int> ok(blocks * n);
    int rc = LONGFORMER_LAUNCH(dynamic_shared, blocks, n, n * sizeof(float), nullptr, out.data(), ok.data());
    bool good = rc == 0;
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < n; ++t) good &= ok[size_t(b * n + t)] && out[size_t(b * n + t)] == float(b * 1000 + n - 1 - t);
    return report(what, good);
  }
  if (what == "coordinates") {
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    std::vector<int> hits(12 * 64, 0);
    int rc = LONGFORMER_LAUNCH(coordinates, grid, block, 0, nullptr, hits.data());
    bool good = rc == 0;
    for (int h : hits) good &= h == 1;
    const int bad_block = LONGFORMER_LAUNCH(coordinates, 1, dim3(2048), 0, nullptr, hits.data());
    const int bad_smem = LONGFORMER_LAUNCH(coordinates, 1, 32, 1 << 20, nullptr, hits.data());
    const int none = LONGFORMER_LAUNCH(no_arguments, 4, 64, 0, nullptr);
    // Above 48 KiB of dynamic shared memory a kernel needs allow_shared_bytes first, as on a GPU.
    const int big = 64 * 1024;
    const int without_opt_in = LONGFORMER_LAUNCH(no_arguments, 1, 32, big, nullptr);
    const int opt_in = longformer::cuda::allow_shared_bytes(no_arguments, big);
    const int with_opt_in = LONGFORMER_LAUNCH(no_arguments, 1, 32, big, nullptr);
    return report(what, good && bad_block == 9 && bad_smem == 1 && none == 0 && without_opt_in == 1 && opt_in == 0 &&
                            with_opt_in == 0,
                  "bad_block=" + std::to_string(bad_block) + " bad_smem=" + std::to_string(bad_smem) +
                      " without_opt_in=" + std::to_string(without_opt_in) + " with_opt_in=" + std::to_string(with_opt_in));
  }
  if (what == "big_block") {
    std::vector<float> out(1024);
    int rc = LONGFORMER_LAUNCH(big_block, 2, 1024, 0, nullptr, out.data());
    bool good = rc == 0;
    for (int t = 0; t < 1024; ++t) good &= out[size_t(t)] == float(t + 127 + 3);
    return report(what, good);
  }
  std::vector<int> out(256);
  if (what == "first_failure")
    return expect_error(what, [&] { (void)LONGFORMER_LAUNCH(fails_in_two_blocks, 40, 64, 0, nullptr, out.data()); });
  if (what == "divergent_barrier")
    return expect_error(what, [&] { (void)LONGFORMER_LAUNCH(divergent_barrier, 3, 128, 0, nullptr, out.data()); });
  if (what == "divergent_shuffle")
    return expect_error(what, [&] { (void)LONGFORMER_LAUNCH(divergent_shuffle, 1, 64, 0, nullptr, out.data()); });
  if (what == "partial_mask")
    return expect_error(what, [&] { (void)LONGFORMER_LAUNCH(partial_mask, 1, 32, 0, nullptr, out.data()); });
  if (what == "conversions" && argc == 5) return conversions(argv[2], argv[3], argv[4]);
  std::fprintf(stderr, "unknown case '%s'\n", what.c_str());
  return 2;
}
