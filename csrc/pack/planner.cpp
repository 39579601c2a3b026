// Lookahead LPT packing planner; mirrors _plan_python in packdit/packing/planner.py operation for
// operation so both produce identical plans.
#include "packdit/planner.h"

#include <algorithm>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>

namespace packdit {
namespace {

// Bins of one window. A bin is in exactly one of two heaps: `by_load` (min (load, id)) holds the
// bins that may have room for the current sample, `parked` (max room, then min id) the bins found
// too full for a recent sample. Selecting a bin for a sample of `need` tokens first moves back the
// parked bins with room >= need, then parks the least-loaded bins without room: each bin moves at
// most once per placement plus once per unpark, so a window costs O((samples + bins) log bins)
// instead of O(samples * bins) for a scan.
class Bins {
 public:
  Bins(int64_t count, int64_t capacity) : capacity_(capacity) { open(count); }

  void open(int64_t count) {
    for (int64_t k = 0; k < count; ++k) {
      const int64_t id = static_cast<int64_t>(load_.size());
      load_.push_back(0.0);
      room_.push_back(capacity_);
      members_.emplace_back();
      by_load_.push({0.0, id});
    }
  }

  // Least (load, id) bin with at least `need` free tokens, or -1.
  int64_t select(int64_t need) {
    while (!parked_.empty() && parked_.top().first >= need) {
      const int64_t b = parked_.top().second;
      parked_.pop();
      by_load_.push({load_[b], b});
    }
    while (!by_load_.empty() && room_[by_load_.top().second] < need) {
      const int64_t b = by_load_.top().second;
      by_load_.pop();
      parked_.push({room_[b], b});
    }
    return by_load_.empty() ? -1 : by_load_.top().second;
  }

  // Places a sample on the bin just returned by select().
  void place(int64_t b, int64_t sample, int64_t tokens, double cost) {
    by_load_.pop();
    load_[b] += cost;
    room_[b] -= tokens;
    members_[b].push_back(sample);
    by_load_.push({load_[b], b});
  }

  int64_t size() const { return static_cast<int64_t>(load_.size()); }

  // Appends the bins, by (load desc, id asc), to `plan`.
  void emit(PackPlan& plan) const {
    std::vector<int64_t> ids(load_.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::sort(ids.begin(), ids.end(), [&](int64_t x, int64_t y) {
      return load_[x] != load_[y] ? load_[x] > load_[y] : x < y;
    });
    for (int64_t b : ids) {
      plan.order.insert(plan.order.end(), members_[b].begin(), members_[b].end());
      plan.bin_offsets.push_back(static_cast<int64_t>(plan.order.size()));
    }
  }

 private:
  using LoadEntry = std::pair<double, int64_t>;
  struct ParkedOrder {  // max room first, then min id
    bool operator()(const std::pair<int64_t, int64_t>& x, const std::pair<int64_t, int64_t>& y) const {
      return x.first != y.first ? x.first < y.first : x.second > y.second;
    }
  };

  int64_t capacity_;
  std::vector<double> load_;
  std::vector<int64_t> room_;
  std::vector<std::vector<int64_t>> members_;
  std::priority_queue<LoadEntry, std::vector<LoadEntry>, std::greater<LoadEntry>> by_load_;
  std::priority_queue<std::pair<int64_t, int64_t>, std::vector<std::pair<int64_t, int64_t>>, ParkedOrder>
      parked_;
};

}  // namespace

PackPlan plan_lookahead(const int64_t* lengths, const double* costs, const uint64_t* keys,
                        int64_t num_samples, int64_t capacity, int64_t ranks, int64_t window) {
  PackPlan plan;
  plan.order.reserve(static_cast<size_t>(num_samples));
  plan.bin_offsets.push_back(0);
  const int64_t budget = window * ranks * capacity;
  const int64_t step_tokens = ranks * capacity;
  std::vector<uint8_t> was_carried(static_cast<size_t>(num_samples), 0);
  std::vector<int64_t> carried, chunk;
  int64_t next_sample = 0;
  int64_t stream_tokens_left = std::accumulate(lengths, lengths + num_samples, int64_t{0});
  while (next_sample < num_samples || !carried.empty()) {
    chunk.assign(carried.begin(), carried.end());
    int64_t chunk_tokens = 0;
    for (int64_t i : carried) chunk_tokens += lengths[i];
    while (next_sample < num_samples && chunk_tokens + lengths[next_sample] <= budget) {
      chunk.push_back(next_sample);
      chunk_tokens += lengths[next_sample];
      stream_tokens_left -= lengths[next_sample];
      ++next_sample;
    }
    if (stream_tokens_left < budget) {  // the rest joins this window rather than forming a short one
      for (; next_sample < num_samples; ++next_sample) chunk.push_back(next_sample);
      chunk_tokens += stream_tokens_left;
      stream_tokens_left = 0;
    }
    const bool final_window = next_sample == num_samples;
    std::sort(chunk.begin(), chunk.end(), [&](int64_t x, int64_t y) {
      if (was_carried[x] != was_carried[y]) return was_carried[x] > was_carried[y];
      if (costs[x] != costs[y]) return costs[x] > costs[y];
      if (keys[x] != keys[y]) return keys[x] < keys[y];
      return x < y;
    });

    Bins bins(ranks * std::max<int64_t>(1, (chunk_tokens + step_tokens - 1) / step_tokens), capacity);
    carried.clear();
    for (int64_t i : chunk) {
      int64_t b = bins.select(lengths[i]);
      if (b < 0 && !final_window && !was_carried[i]) {
        was_carried[i] = 1;
        carried.push_back(i);
        continue;
      }
      while (b < 0) {
        bins.open(ranks);
        b = bins.select(lengths[i]);
      }
      bins.place(b, i, lengths[i], costs[i]);
    }
    std::sort(carried.begin(), carried.end());
    bins.emit(plan);
  }
  return plan;
}

}  // namespace packdit
