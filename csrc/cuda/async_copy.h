// Asynchronous global -> shared copies (cp.async, sm_80+), the loads of a multi-stage pipeline:
// a thread issues 16-byte copies, closes them into a commit group, and later waits until at most
// `pending` of its most recent groups are still in flight. The copied bytes are visible to the
// issuing thread after the wait, and to the other threads of the block after a __syncthreads()
// that follows the wait.
//
// Under LONGFORMER_HOST_EMULATION the copies land only at the wait that covers them
// (emulation/host_cuda.h), so a kernel that reads a stage before waiting for it fails its tests.
#pragma once

#include <cstdint>

#include "device.h"

namespace longformer::cuda {

// Copies 16 bytes from `src` to shared memory at `dst` (both 16-byte aligned); with from_source
// false it writes 16 zero bytes and reads nothing (src must still be a valid address: the hardware
// takes it as an operand).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool from_source) {
#ifdef LONGFORMER_HOST_EMULATION
  emulation::async_copy_16(dst, src, from_source);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  // .cg: cached in L2 only; K/V tiles are shared between blocks through L2, not L1.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src),
               "r"(from_source ? 16 : 0));
#endif
}

// Closes the copies issued since the last commit into one group.
__device__ __forceinline__ void cp_async_commit() {
#ifdef LONGFORMER_HOST_EMULATION
  emulation::async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LONGFORMER_HOST_EMULATION
  emulation::async_wait(kPending);
#else
  // "memory": shared-memory reads of the landed data must not move above the wait.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

}  // namespace longformer::cuda
