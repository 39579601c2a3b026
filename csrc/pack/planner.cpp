// Lookahead LPT packing planner with sequence-parallel groups; mirrors _plan_python in
// packdit/packing/planner.py operation for operation so both produce identical plans.
#include "packdit/planner.h"

#include <algorithm>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>

namespace packdit {
namespace {

// Bins of one window, each of a size class c (run by sizes[c] ranks, room sizes[c] * capacity tokens).
// Within a class a bin is in exactly one of two heaps: `by_load` (min (load, id)) holds the bins that may
// have room for the current sample, `parked` (max room, then min id) the bins found too full for a recent
// sample. Selecting a bin of class c for a sample of `need` tokens first moves back the parked bins with
// room >= need, then parks the least-loaded bins without room: each bin moves at most once per placement
// plus once per unpark, so a window costs O((samples * classes + bins) log bins) instead of
// O(samples * bins) for a scan.
class Bins {
 public:
  Bins(const std::vector<int64_t>& sizes, int64_t capacity)
      : sizes_(sizes), capacity_(capacity), classes_(sizes.size()) {}

  // Opens `count` empty bins of class `c`.
  void open(int64_t c, int64_t count) {
    for (int64_t k = 0; k < count; ++k) {
      const int64_t id = static_cast<int64_t>(load_.size());
      load_.push_back(0.0);
      room_.push_back(sizes_[c] * capacity_);
      class_of_.push_back(c);
      members_.emplace_back();
      classes_[c].by_load.push({0.0, id});
    }
  }

  // Least (load, id) bin of class `c` with at least `need` free tokens, or -1.
  int64_t select(int64_t c, int64_t need) {
    Heaps& h = classes_[c];
    while (!h.parked.empty() && h.parked.top().first >= need) {
      const int64_t b = h.parked.top().second;
      h.parked.pop();
      h.by_load.push({load_[b], b});
    }
    while (!h.by_load.empty() && room_[h.by_load.top().second] < need) {
      const int64_t b = h.by_load.top().second;
      h.by_load.pop();
      h.parked.push({room_[b], b});
    }
    return h.by_load.empty() ? -1 : h.by_load.top().second;
  }

  // Places a sample on the bin just returned by select() for its class; `share` is what each of the
  // bin's ranks carries of it.
  void place(int64_t b, int64_t sample, int64_t tokens, double share) {
    Heaps& h = classes_[class_of_[b]];
    h.by_load.pop();
    load_[b] += share;
    room_[b] -= tokens;
    members_[b].push_back(sample);
    h.by_load.push({load_[b], b});
  }

  double load(int64_t b) const { return load_[b]; }
  int64_t class_of(int64_t b) const { return class_of_[b]; }

  // Appends the window's steps to `plan`: level by level, the bins of class c and the groups formed at
  // the level below, sorted by (load desc, id asc), are cut into groups of sizes[c+1] / sizes[c] (ranks /
  // sizes.back() at the top); a group's key and id are its first member's. Every group is an aligned
  // block of ranks, and each top-level group one step.
  void emit(PackPlan& plan, int64_t ranks) const {
    struct Item {
      double key;
      int64_t id;
      int64_t begin, end;  // its bins, layout[begin:end) in rank order
    };
    std::vector<int64_t> layout, next_layout;
    std::vector<Item> items, next_items;
    const int64_t num_bins = static_cast<int64_t>(load_.size());
    for (size_t c = 0; c < sizes_.size(); ++c) {
      for (int64_t b = 0; b < num_bins; ++b) {
        if (class_of_[b] != static_cast<int64_t>(c)) continue;
        const int64_t at = static_cast<int64_t>(layout.size());
        items.push_back({load_[b], b, at, at + 1});
        layout.push_back(b);
      }
      std::sort(items.begin(), items.end(), [](const Item& x, const Item& y) {
        return x.key != y.key ? x.key > y.key : x.id < y.id;
      });
      const int64_t per_group = (c + 1 < sizes_.size() ? sizes_[c + 1] : ranks) / sizes_[c];
      next_layout.clear();
      next_items.clear();
      for (size_t k = 0; k < items.size(); k += static_cast<size_t>(per_group)) {
        const int64_t begin = static_cast<int64_t>(next_layout.size());
        for (size_t j = k; j < k + static_cast<size_t>(per_group); ++j) {
          next_layout.insert(next_layout.end(), layout.begin() + items[j].begin, layout.begin() + items[j].end);
        }
        next_items.push_back({items[k].key, items[k].id, begin, static_cast<int64_t>(next_layout.size())});
      }
      layout.swap(next_layout);
      items.swap(next_items);
    }
    for (int64_t b : layout) {
      plan.order.insert(plan.order.end(), members_[b].begin(), members_[b].end());
      plan.bin_offsets.push_back(static_cast<int64_t>(plan.order.size()));
      plan.bin_sizes.push_back(sizes_[class_of_[b]]);
    }
  }

 private:
  using LoadEntry = std::pair<double, int64_t>;
  struct ParkedOrder {  // max room first, then min id
    bool operator()(const std::pair<int64_t, int64_t>& x, const std::pair<int64_t, int64_t>& y) const {
      return x.first != y.first ? x.first < y.first : x.second > y.second;
    }
  };
  struct Heaps {
    std::priority_queue<LoadEntry, std::vector<LoadEntry>, std::greater<LoadEntry>> by_load;
    std::priority_queue<std::pair<int64_t, int64_t>, std::vector<std::pair<int64_t, int64_t>>, ParkedOrder>
        parked;
  };

  const std::vector<int64_t>& sizes_;
  int64_t capacity_;
  std::vector<double> load_;
  std::vector<int64_t> room_;
  std::vector<int64_t> class_of_;
  std::vector<std::vector<int64_t>> members_;
  std::vector<Heaps> classes_;
};

}  // namespace

PackPlan plan_lookahead(const int64_t* lengths, const double* costs, const double* alltoall,
                        const uint64_t* keys, int64_t num_samples, int64_t capacity, int64_t ranks,
                        int64_t window, const std::vector<int64_t>& sp_sizes) {
  PackPlan plan;
  plan.order.reserve(static_cast<size_t>(num_samples));
  plan.bin_offsets.push_back(0);
  const int64_t num_classes = static_cast<int64_t>(sp_sizes.size());
  const int64_t budget = window * ranks * capacity;
  const int64_t step_tokens = ranks * capacity;
  // priority[i] = 2 * class + carried: the LPT order's first two keys, (class desc, carried first), in one
  std::vector<uint8_t> priority(static_cast<size_t>(num_samples), 0);
  std::vector<int64_t> footprint(static_cast<size_t>(num_samples));
  int64_t stream_tokens_left = 0;
  for (int64_t i = 0; i < num_samples; ++i) {
    int64_t c = 0;
    while (lengths[i] > sp_sizes[c] * capacity) ++c;
    priority[i] = static_cast<uint8_t>(2 * c);
    footprint[i] = c == 0 ? lengths[i] : sp_sizes[c] * capacity;
    stream_tokens_left += footprint[i];
  }
  const auto class_of = [&](int64_t i) { return static_cast<int64_t>(priority[i] >> 1); };
  const auto share = [&](int64_t i, int64_t c) {  // what each rank of a size-class-c bin carries of sample i
    return c == 0 ? costs[i] : (costs[i] + alltoall[i]) / static_cast<double>(sp_sizes[c]);
  };
  std::vector<int64_t> carried, chunk, class_count(static_cast<size_t>(num_classes));
  int64_t next_sample = 0;
  while (next_sample < num_samples || !carried.empty()) {
    chunk.assign(carried.begin(), carried.end());
    int64_t chunk_tokens = 0;
    for (int64_t i : carried) chunk_tokens += footprint[i];
    while (next_sample < num_samples && chunk_tokens + footprint[next_sample] <= budget) {
      chunk.push_back(next_sample);
      chunk_tokens += footprint[next_sample];
      stream_tokens_left -= footprint[next_sample];
      ++next_sample;
    }
    if (stream_tokens_left < budget) {  // the rest joins this window rather than forming a short one
      for (; next_sample < num_samples; ++next_sample) chunk.push_back(next_sample);
      chunk_tokens += stream_tokens_left;
      stream_tokens_left = 0;
    }
    const bool final_window = next_sample == num_samples;
    std::sort(chunk.begin(), chunk.end(), [&](int64_t x, int64_t y) {
      if (priority[x] != priority[y]) return priority[x] > priority[y];
      if (costs[x] != costs[y]) return costs[x] > costs[y];
      if (keys[x] != keys[y]) return keys[x] < keys[y];
      return x < y;
    });

    std::fill(class_count.begin(), class_count.end(), 0);
    int64_t group_ranks = 0;  // ranks of the bins reserved for the samples of class > 0
    for (int64_t i : chunk) {
      const int64_t c = class_of(i);
      if (c > 0) {
        ++class_count[c];
        group_ranks += sp_sizes[c];
      }
    }
    Bins bins(sp_sizes, capacity);
    bins.open(0, ranks * std::max<int64_t>(1, (chunk_tokens + step_tokens - 1) / step_tokens) - group_ranks);
    for (int64_t c = 1; c < num_classes; ++c) bins.open(c, class_count[c]);
    carried.clear();
    for (int64_t i : chunk) {
      const int64_t own = class_of(i);
      int64_t best = -1;
      double best_finish = 0.0;
      const int64_t last = own == 0 ? num_classes - 1 : own;  // a long sample: its own size only
      for (int64_t c = own; c <= last; ++c) {
        const int64_t b = bins.select(c, lengths[i]);
        if (b < 0) continue;
        const double finish = bins.load(b) + share(i, c);
        if (best < 0 || finish < best_finish) {
          best = b;
          best_finish = finish;
        }
      }
      if (best < 0 && !final_window && priority[i] % 2 == 0) {
        priority[i] |= 1;
        carried.push_back(i);
        continue;
      }
      if (best < 0) {  // a new step (only a sample of size class 0 finds no bin: see the header)
        bins.open(0, ranks);
        best = bins.select(0, lengths[i]);
      }
      bins.place(best, i, lengths[i], share(i, bins.class_of(best)));
    }
    std::sort(carried.begin(), carried.end());
    bins.emit(plan, ranks);
  }
  return plan;
}

}  // namespace packdit
