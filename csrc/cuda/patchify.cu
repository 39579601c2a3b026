#include "packdit/patchify.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace packdit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // grid-stride beyond 16.7M elements per pass

// One thread per packed element (token n, feature f): consecutive threads
// write consecutive token-buffer addresses (coalesced), and read runs of pw
// contiguous latent elements (iw is the fastest feature index in conv order).
template <typename T, bool kToTokens>
__global__ void patch_copy_kernel(const int64_t* __restrict__ desc,
                                  const int32_t* __restrict__ segment_ids,
                                  const int64_t* __restrict__ raster_index, PatchGeometry g,
                                  T* __restrict__ tokens) {
  const int64_t features = g.channels * g.pt * g.ph * g.pw;
  const int64_t total = g.num_tokens * features;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t n = i / features;
    int64_t f = i - n * features;
    const int64_t* d = desc + static_cast<int64_t>(__ldg(segment_ids + n)) * kPatchDescFields;
    const int64_t grid_h = __ldg(d + 6);
    const int64_t grid_w = __ldg(d + 7);
    const int64_t r = raster_index != nullptr ? __ldg(raster_index + n) : n - __ldg(d + 8);
    const int64_t t = r / (grid_h * grid_w);
    const int64_t rem = r - t * grid_h * grid_w;
    const int64_t h = rem / grid_w;
    const int64_t w = rem - h * grid_w;
    int64_t c, it, ih, iw;
    if (g.channels_last) {  // f = ((it*ph + ih)*pw + iw)*C + c
      c = f % g.channels;
      f /= g.channels;
      iw = f % g.pw;
      f /= g.pw;
      ih = f % g.ph;
      it = f / g.ph;
    } else {  // f = ((c*pt + it)*ph + ih)*pw + iw
      iw = f % g.pw;
      f /= g.pw;
      ih = f % g.ph;
      f /= g.ph;
      it = f % g.pt;
      c = f / g.pt;
    }
    const int64_t offset = c * __ldg(d + 1) + (t * g.pt + it) * __ldg(d + 2) +
                           (h * g.ph + ih) * __ldg(d + 3) + (w * g.pw + iw) * __ldg(d + 4);
    T* sample = reinterpret_cast<T*>(static_cast<uintptr_t>(__ldg(d + 0)));
    if constexpr (kToTokens) {
      tokens[i] = sample[offset];
    } else {
      sample[offset] = tokens[i];
    }
  }
}

template <bool kToTokens>
void launch(const int64_t* desc, const int32_t* segment_ids, const int64_t* raster_index,
            const PatchGeometry& g, void* tokens, cudaStream_t stream) {
  const int64_t total = g.num_tokens * g.channels * g.pt * g.ph * g.pw;
  if (total <= 0) return;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
  const dim3 grid(static_cast<unsigned int>(blocks));
  switch (g.elem_size) {
    case 1:
      patch_copy_kernel<uint8_t, kToTokens><<<grid, kThreads, 0, stream>>>(
          desc, segment_ids, raster_index, g, static_cast<uint8_t*>(tokens));
      break;
    case 2:
      patch_copy_kernel<uint16_t, kToTokens><<<grid, kThreads, 0, stream>>>(
          desc, segment_ids, raster_index, g, static_cast<uint16_t*>(tokens));
      break;
    case 4:
      patch_copy_kernel<uint32_t, kToTokens><<<grid, kThreads, 0, stream>>>(
          desc, segment_ids, raster_index, g, static_cast<uint32_t*>(tokens));
      break;
    case 8:
      patch_copy_kernel<uint64_t, kToTokens><<<grid, kThreads, 0, stream>>>(
          desc, segment_ids, raster_index, g, static_cast<uint64_t*>(tokens));
      break;
    default:
      throw std::runtime_error("packdit: patchify supports element sizes 1, 2, 4, 8 bytes, got " +
                               std::to_string(g.elem_size));
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("packdit: patchify launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace

void patchify_cuda(const int64_t* desc, const int32_t* segment_ids, const int64_t* raster_index,
                   const PatchGeometry& geometry, void* tokens, cudaStream_t stream) {
  launch<true>(desc, segment_ids, raster_index, geometry, tokens, stream);
}

void unpatchify_cuda(const int64_t* desc, const int32_t* segment_ids, const int64_t* raster_index,
                     const PatchGeometry& geometry, const void* tokens, cudaStream_t stream) {
  launch<false>(desc, segment_ids, raster_index, geometry, const_cast<void*>(tokens), stream);
}

}  // namespace packdit
