// Load-balanced packing planner (see packdit/packing/planner.py for the full description).
//
// Given per-sample token counts, costs and tie keys in stream order, assigns every sample to a
// bin (one rank's pack at one step) so that no bin holds more than `capacity` tokens and the bins
// of a step have similar cost. Per window of `window` steps:
//   chunk  = carried samples + stream samples while the chunk holds <= window*ranks*capacity tokens
//            (all the rest of the stream if it holds fewer tokens than that)
//   bins   = ranks * max(1, ceil(chunk_tokens / (ranks*capacity)))
//   LPT    : samples by (carried first, cost desc, key asc, index asc), each onto the bin of least
//            (cost, id) among bins with room for it; no room -> carried to the next window once,
//            else (already carried, or end of stream) `ranks` new bins are opened
//   output : bins by (cost desc, id asc), consecutive groups of `ranks` bins form the steps.
#pragma once

#include <cstdint>
#include <vector>

namespace packdit {

struct PackPlan {
  std::vector<int64_t> order;        // sample indices grouped by bin
  std::vector<int64_t> bin_offsets;  // bin k holds order[bin_offsets[k] : bin_offsets[k+1]]
};

// lengths[i] <= capacity for every i; costs finite and >= 0; capacity, ranks, window > 0 and
// window*ranks*capacity < 2^62 (checked by the Python caller).
PackPlan plan_lookahead(const int64_t* lengths, const double* costs, const uint64_t* keys,
                        int64_t num_samples, int64_t capacity, int64_t ranks, int64_t window);

}  // namespace packdit
