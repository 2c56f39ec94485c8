// The per-token inputs every attention kernel reads, prepared on the device in one launch (the
// glue used to build them from a dozen ATen ops, a sort among them):
//   roles[b][n]  = kPadding where attention_mask is 0, else kGlobal where global_attention_mask is
//                  set, else kLocal (docs/design.md §2; a padding token marked global is padding);
//   index[b][g]  = the positions of batch row b's global tokens, ascending, for g < count[b];
//   count[b]     = how many there are.
// Masks are read as raw integers of any width (nonzero = set), through their strides, so no mask
// is converted or copied first. One block per batch row walks its N tokens in order, 256 at a time:
// a ballot per warp and the warps' totals in shared memory give each global token its slot, so the
// result does not depend on thread timing. Packed sequences' bounds (cu_seqlens, int32 or int64) are
// copied to int64 here too.
#include <cstdint>

#include "device.h"
#include "launchers.h"

namespace longformer::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void token_roles_kernel(const MaskView attention, const MaskView global, int64_t seqlen, uint8_t* roles,
                                   int64_t* index, int64_t* count) {
  __shared__ int64_t warp_counts[kWarps];
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  int64_t before = 0;  // global tokens of row b before the current chunk
  for (int64_t n0 = 0; n0 < seqlen; n0 += kThreads) {
    const int64_t n = n0 + tid;
    bool is_global = false;
    if (n < seqlen) {
      const Role role = token_role(attention, global, b, n);
      is_global = role == kGlobal;
      roles[b * seqlen + n] = role;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, is_global);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int64_t slot = before + __popc(ballot & ((1u << lane) - 1u));
    int64_t chunk_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) slot += warp_counts[w];
      chunk_total += warp_counts[w];
    }
    if (is_global) index[b * seqlen + slot] = n;
    before += chunk_total;
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }
  if (tid == 0) count[b] = before;
}

__global__ void copy_cu_seqlens_kernel(const void* src, int element_bytes, int64_t stride, int64_t count,
                                       int64_t* dst) {
  for (int64_t s = threadIdx.x; s < count; s += blockDim.x) {
    dst[s] = element_bytes == 4 ? static_cast<const int32_t*>(src)[s * stride] : static_cast<const int64_t*>(src)[s * stride];
  }
}

}  // namespace

int copy_cu_seqlens(const void* src, int element_bytes, int64_t stride, int64_t count, int64_t* dst, void* stream) {
  if (count == 0) return 0;
  return LONGFORMER_LAUNCH(copy_cu_seqlens_kernel, dim3(1), dim3(kThreads), 0, stream, src, element_bytes, stride,
                           count, dst);
}

int prepare_token_roles(const MaskView& attention_mask, const MaskView& global_attention_mask, int64_t batch,
                        int64_t seqlen, uint8_t* roles, int64_t* global_index, int64_t* global_count, void* stream) {
  if (batch == 0) return 0;
  if (batch > 2147483647) return 1;  // cudaErrorInvalidValue: more batch rows than a grid holds
  return LONGFORMER_LAUNCH(token_roles_kernel, dim3(static_cast<unsigned>(batch)), dim3(kThreads), 0, stream,
                           attention_mask, global_attention_mask, seqlen, roles, global_index, global_count);
}

}  // namespace longformer::cuda
