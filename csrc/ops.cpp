// The `longformer` op library: its schemas (longformer/schemas.h). The backends register the one
// glue (longformer/glue.h) for their dispatch key: csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp.
#include "longformer/schemas.h"

STABLE_TORCH_LIBRARY(longformer, m) { longformer::define_schemas(m); }
