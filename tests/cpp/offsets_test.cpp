// Offsets of rows in tensors with more than 2^31 elements, without allocating them: the params
// struct must do all index arithmetic in 64 bits.
#include <cstdio>
#include <cstdlib>

#include "longformer/params.h"

using longformer::AttentionParams;
using longformer::BandedMatmulParams;
using longformer::RowMajorHeads;

static int failures = 0;

static void expect_eq(__int128 got, __int128 want, const char* what) {
  if (got != want) {
    std::printf("FAIL %s: got %lld want %lld\n", what, static_cast<long long>(got), static_cast<long long>(want));
    ++failures;
  }
}

int main() {
  // [B, H, N, D] = [4, 16, 65536, 128] as a head-split view of [B, N, H*D]: 2^31 elements.
  const int64_t B = 4, H = 16, N = 65536, D = 128;
  RowMajorHeads t{nullptr, N * H * D, D, H * D};
  expect_eq(t.offset(B - 1, H - 1, N - 1), (__int128)(B - 1) * N * H * D + (H - 1) * D + (__int128)(N - 1) * H * D,
            "head-split last row");
  expect_eq(t.offset(3, 0, 0), (__int128)3 * N * H * D, "batch stride beyond 2^31");

  AttentionParams p;
  p.batch = 64;
  p.heads = 64;
  p.seqlen = p.queries = 1 << 20;  // lse has 2^32 entries
  expect_eq(p.lse_offset(63, 63, (1 << 20) - 1), (__int128)64 * 64 * (1 << 20) - 1, "lse last entry");
  // Queries inside a longer key sequence: rows are positions minus q_offset.
  p.queries = 1 << 19;
  p.q_offset = 1 << 19;
  expect_eq(p.lse_position_offset(63, 63, (1 << 20) - 1), (__int128)64 * 64 * (1 << 19) - 1, "lse of the last position");
  expect_eq(p.query_offset(t, B - 1, H - 1, p.q_offset), t.offset(B - 1, H - 1, 0), "first query row");
  p.heads_kv = 16;  // groups of 4 query heads
  expect_eq(p.kv_head(63), 15, "KV head of the last query head");
  expect_eq(p.grad_kv_head(63), 15, "gradient head, summed per group");
  p.grad_kv_per_query_head = true;
  expect_eq(p.grad_kv_head(63), 63, "gradient head, one slice per query head");

  BandedMatmulParams m;
  m.batch = 8;
  m.heads = 16;
  m.seqlen = 1 << 16;
  m.window_left = 511;
  m.window_right = 512;  // band width 1024: 2^33 band entries in all
  expect_eq(m.band_offset(7, 15, (1 << 16) - 1), ((__int128)8 * 16 * (1 << 16) - 1) * 1024, "band last row");

  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
