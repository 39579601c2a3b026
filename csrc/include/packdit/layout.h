// Packed-layout metadata kernels.
//
// A packed batch concatenates B samples. Sample b has a (T, H, W) grid of
// patches (grid[3*b + 0..2]) and owns tokens cu_seqlens[b] .. cu_seqlens[b+1].
// Token i of sample b has raster index r inside the sample's full grid:
// r = i - cu_seqlens[b], or r = token_index[i] when tokens were dropped.
// The kernels write
//   segment_ids[i]            = b
//   positions[3*i + 0, 1, 2] = (t, h, w) with r = t*H*W + h*W + w.
//
// Inputs are not validated beyond what is needed to stay in bounds for
// consistent inputs (cu_seqlens non-decreasing, cu_seqlens[0] = 0,
// cu_seqlens[B] = num_tokens). Tokens not covered by any segment get
// segment id -1 and position (0, 0, 0).
#pragma once

#include <cstdint>

// Same declaration as in cuda_runtime_api.h, so this header does not need
// the CUDA headers.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace packdit {

// Single pass over the segments on the host.
void layout_positions_cpu(const int32_t* cu_seqlens, const int32_t* grid,
                          const int32_t* token_index,  // nullable
                          int64_t num_segments, int64_t num_tokens,
                          int32_t* segment_ids, int32_t* positions);

#ifdef PACKDIT_WITH_CUDA
// One launch over all tokens on `stream`; all pointers are device pointers.
// Throws std::runtime_error if the launch fails.
void layout_positions_cuda(const int32_t* cu_seqlens, const int32_t* grid,
                           const int32_t* token_index,  // nullable
                           int64_t num_segments, int64_t num_tokens,
                           int32_t* segment_ids, int32_t* positions,
                           cudaStream_t stream);
#endif

}  // namespace packdit
