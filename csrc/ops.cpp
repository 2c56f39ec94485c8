// The `longformer` op library: its schemas (longformer/schemas.h); backends only add
// TORCH_LIBRARY_IMPL blocks (csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp).
#include "longformer/schemas.h"

TORCH_LIBRARY(longformer, m) { longformer::define_schemas(m); }
