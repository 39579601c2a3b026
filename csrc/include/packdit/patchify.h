// Patchify / unpatchify of packed ragged samples: one launch copies every
// sample's (C, T, H, W) latent into its rows of the packed (N, F) token
// buffer, F = C * pt * ph * pw, or back.
//
// Sample b is described by row b of an int64 table `desc` (device memory),
// kPatchDescFields values per sample:
//   [0]     address of the sample's first element (its data pointer)
//   [1..4]  element strides of its C, T, H, W dimensions
//   [5..7]  patch grid (T', H', W') = (T / pt, H / ph, W / pw)
//   [8]     first packed token of the sample (cu_seqlens[b])
// Token n belongs to sample segment_ids[n] and sits at raster index
// r = raster_index[n] (kept-token layouts) or n - desc[b][8] (raster_index
// null) of its sample's grid: (t, h, w) with r = t*H'*W' + h*W' + w.
// Feature f of a token is ordered (c, it, ih, iw) (Conv3d weight flattening),
// or (it, ih, iw, c) when channels_last; it reads latent element
//   (c, t*pt + it, h*ph + ih, w*pw + iw).
// The copy moves raw elements of `elem_size` bytes (1, 2, 4 or 8): it is
// bit-exact for any dtype. Inputs are trusted (validated by the Python
// caller); nothing is written for num_tokens == 0.
#pragma once

#include <cstdint>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace packdit {

constexpr int kPatchDescFields = 9;

struct PatchGeometry {
  int64_t num_tokens;
  int64_t channels;
  int32_t pt, ph, pw;
  int32_t elem_size;
  bool channels_last;
};

#ifdef PACKDIT_WITH_CUDA
// Gather samples -> tokens (N, F) contiguous. Throws std::runtime_error on a
// launch failure or an unsupported elem_size.
void patchify_cuda(const int64_t* desc, const int32_t* segment_ids,
                   const int64_t* raster_index,  // nullable
                   const PatchGeometry& geometry, void* tokens, cudaStream_t stream);

// Scatter tokens (N, F) contiguous -> samples (positions of dropped tokens
// are left untouched).
void unpatchify_cuda(const int64_t* desc, const int32_t* segment_ids,
                     const int64_t* raster_index,  // nullable
                     const PatchGeometry& geometry, const void* tokens, cudaStream_t stream);
#endif

}  // namespace packdit
