#include "packdit/layout.h"

#include <algorithm>

namespace packdit {
namespace {

inline void fill_uncovered(int64_t begin, int64_t end, int32_t* segment_ids,
                           int32_t* positions) {
  if (end <= begin) return;
  std::fill(segment_ids + begin, segment_ids + end, int32_t{-1});
  std::fill(positions + 3 * begin, positions + 3 * end, int32_t{0});
}

}  // namespace

void layout_positions_cpu(const int32_t* cu_seqlens, const int32_t* grid,
                          const int32_t* token_index, int64_t num_segments,
                          int64_t num_tokens, int32_t* segment_ids,
                          int32_t* positions) {
  if (num_tokens <= 0) return;
  int64_t covered = 0;  // tokens [0, covered) have been written
  for (int64_t b = 0; b < num_segments; ++b) {
    const int64_t begin = std::max<int64_t>(cu_seqlens[b], covered);
    const int64_t end = std::min<int64_t>(cu_seqlens[b + 1], num_tokens);
    if (end <= begin) continue;
    fill_uncovered(covered, begin, segment_ids, positions);
    covered = end;

    std::fill(segment_ids + begin, segment_ids + end, static_cast<int32_t>(b));
    const int64_t H = grid[3 * b + 1];
    const int64_t W = grid[3 * b + 2];
    int32_t* out = positions + 3 * begin;
    if (H <= 0 || W <= 0) {  // no valid raster index exists
      std::fill(out, positions + 3 * end, int32_t{0});
      continue;
    }

    if (token_index != nullptr) {
      const int64_t HW = H * W;
      for (int64_t i = begin; i < end; ++i, out += 3) {
        const int64_t r = token_index[i];
        const int64_t t = r / HW;
        const int64_t rem = r - t * HW;
        const int64_t h = rem / W;
        out[0] = static_cast<int32_t>(t);
        out[1] = static_cast<int32_t>(h);
        out[2] = static_cast<int32_t>(rem - h * W);
      }
    } else {
      // Raster order: walk the grid instead of dividing per token.
      const int64_t n = end - begin;
      int64_t i = 0;
      for (int32_t t = 0; i < n; ++t) {
        for (int32_t h = 0; h < H && i < n; ++h) {
          for (int32_t w = 0; w < W && i < n; ++w, ++i, out += 3) {
            out[0] = t;
            out[1] = h;
            out[2] = w;
          }
        }
      }
    }
  }
  fill_uncovered(covered, num_tokens, segment_ids, positions);
}

}  // namespace packdit
