#include "packdit/layout.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace packdit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // grid-stride beyond this

__global__ void layout_positions_kernel(const int32_t* __restrict__ cu_seqlens,
                                        const int32_t* __restrict__ grid,
                                        const int32_t* __restrict__ token_index,
                                        int64_t num_segments, int64_t num_tokens,
                                        int32_t* __restrict__ segment_ids,
                                        int32_t* __restrict__ positions) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < num_tokens; i += stride) {
    // upper_bound: first j in [0, B] with cu_seqlens[j] > i; segment = j - 1.
    int64_t lo = 0;
    int64_t hi = num_segments + 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cu_seqlens[mid] <= i) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t b = lo - 1;
    int32_t* out = positions + 3 * i;
    const int64_t H = (b >= 0 && b < num_segments) ? grid[3 * b + 1] : 0;
    const int64_t W = (b >= 0 && b < num_segments) ? grid[3 * b + 2] : 0;
    segment_ids[i] = (b >= 0 && b < num_segments) ? static_cast<int32_t>(b) : -1;
    if (H <= 0 || W <= 0) {
      out[0] = 0;
      out[1] = 0;
      out[2] = 0;
      continue;
    }
    const int64_t r = token_index != nullptr ? static_cast<int64_t>(token_index[i])
                                             : i - cu_seqlens[b];
    const int64_t HW = H * W;
    const int64_t t = r / HW;
    const int64_t rem = r - t * HW;
    const int64_t h = rem / W;
    out[0] = static_cast<int32_t>(t);
    out[1] = static_cast<int32_t>(h);
    out[2] = static_cast<int32_t>(rem - h * W);
  }
}

}  // namespace

void layout_positions_cuda(const int32_t* cu_seqlens, const int32_t* grid,
                           const int32_t* token_index, int64_t num_segments,
                           int64_t num_tokens, int32_t* segment_ids,
                           int32_t* positions, cudaStream_t stream) {
  if (num_tokens <= 0) return;
  const int64_t blocks =
      std::min<int64_t>((num_tokens + kThreads - 1) / kThreads, kMaxBlocks);
  layout_positions_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      cu_seqlens, grid, token_index, num_segments, num_tokens, segment_ids,
      positions);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("packdit: layout_positions_cuda launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace packdit
