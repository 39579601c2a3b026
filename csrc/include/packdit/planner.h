// Load-balanced packing planner with sequence-parallel groups (see packdit/packing/planner.py for the full
// description).
//
// Given per-sample token counts, costs, all-to-all costs and tie keys in stream order, assigns every sample
// to a bin: one pack at one step, run by a group of sp_sizes[c] ranks (class c; class 0 is one rank, a
// larger class sequence parallelism, the pack's tokens split over the group). A sample of L tokens has the
// class of the smallest sp_sizes[c] with L <= sp_sizes[c] * capacity; a bin of class c holds at most
// sp_sizes[c] * capacity tokens and each of its ranks carries `load` = the sum over its samples of cost
// (class 0) or (cost + alltoall) / sp_sizes[c] (class c > 0). Per window:
//   chunk  = carried samples + stream samples while the chunk's footprint is <= window*ranks*capacity
//            tokens (footprint: L for class 0, sp_sizes[c]*capacity for class c > 0; the whole rest of the
//            stream if its footprint is smaller than that)
//   bins   = one bin of class c per sample of class c > 0, and unit bins for the rest of
//            ranks * max(1, ceil(footprint / (ranks*capacity))) ranks
//   LPT    : samples by (class desc, carried first, cost desc, key asc, index asc); a sample of class
//            c > 0 goes on the least (load, id) bin of class c with room (there always is one: the bins
//            of class c are as many as its samples, which come first); a sample of class 0 goes where it
//            finishes first: for every class the least (load, id) bin with room, then the least
//            load + share (ties: the smaller class); no room -> carried to the next window once, else
//            (already carried, or end of stream) `ranks` unit bins (one more step) are opened
//   output : bins merged level by level: the bins of size sp[j] (and the groups of the level below)
//            sorted by (load desc, id asc) and cut into consecutive groups of sp[j+1]/sp[j] (ranks/sp[-1]
//            at the top); each top-level group is one step, its bins in rank order (aligned blocks).
#pragma once

#include <cstdint>
#include <vector>

namespace packdit {

struct PackPlan {
  std::vector<int64_t> order;        // sample indices grouped by bin
  std::vector<int64_t> bin_offsets;  // bin k holds order[bin_offsets[k] : bin_offsets[k+1]]
  std::vector<int64_t> bin_sizes;    // bin k is run by bin_sizes[k] ranks; bins tile each step's ranks in order
};

// lengths[i] <= sp_sizes.back() * capacity for every i; costs and alltoall finite and >= 0; capacity, ranks,
// window > 0 and window*ranks*capacity < 2^62; sp_sizes ascending, sp_sizes[0] == 1, each dividing the next
// and ranks (checked by the Python caller).
PackPlan plan_lookahead(const int64_t* lengths, const double* costs, const double* alltoall,
                        const uint64_t* keys, int64_t num_samples, int64_t capacity, int64_t ranks,
                        int64_t window, const std::vector<int64_t>& sp_sizes);

}  // namespace packdit
