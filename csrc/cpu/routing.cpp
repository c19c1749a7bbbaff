// CPU routing: histogram, cumsums and a stable counting sort of the T*k slots by expert.
//
// One pass validates ids and counts them, a pass over the E experts builds the cumsums, and
// a second pass over the slots scatters each slot to its sorted position (a counting sort is
// stable by construction: slots of one expert are visited, and placed, in slot order).
// O(n + E) time, O(E) scratch.

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../bsmoe.h"

namespace bsmoe {
namespace {

template <typename Id>
void route_impl(const Id* ids, int64_t n, int64_t num_experts, int64_t block, const RouteOut& o) {
  std::vector<int64_t> count(static_cast<size_t>(num_experts), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e < 0 || e >= num_experts) {
      throw std::invalid_argument("route: expert_indices holds " + std::to_string(e) + " at flat position " +
                                  std::to_string(i) + ", outside [0, " + std::to_string(num_experts) + ")");
    }
    ++count[static_cast<size_t>(e)];
  }
  // cursor[e]: next sorted position of expert e (starts at its exclusive cumsum).
  std::vector<int64_t> cursor(static_cast<size_t>(num_experts));
  int64_t acc = 0, padded_acc = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t c = count[static_cast<size_t>(e)];
    cursor[static_cast<size_t>(e)] = acc;
    acc += c;
    padded_acc += round_up(c, block);
    if (padded_acc > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument("route: padded rows exceed the int32 range (" + std::to_string(padded_acc) + ")");
    }
    o.tokens_per_expert[e] = static_cast<int32_t>(c);
    o.bins[e] = static_cast<int32_t>(acc);
    o.padded_bins[e] = static_cast<int32_t>(padded_acc);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    const int64_t p = cursor[static_cast<size_t>(e)]++;
    o.indices[p] = static_cast<int32_t>(i);
    o.bin_ids[p] = static_cast<int32_t>(e);
    o.rows[i] = static_cast<int32_t>(p);
    o.padded_rows[i] = static_cast<int32_t>(
        padded_row_of(p, count[static_cast<size_t>(e)], o.bins[e], o.padded_bins[e], block));
  }
}

}  // namespace

void route_cpu(const void* ids, int id_bytes, int64_t n, int64_t num_experts, int64_t block, const RouteOut& out) {
  if (n < 0 || n > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("route: T*k = " + std::to_string(n) + " slots do not fit int32 indices");
  }
  if (num_experts < 1) throw std::invalid_argument("route: num_experts must be >= 1");
  if (block < 1) throw std::invalid_argument("route: block_size must be >= 1");
  if (id_bytes == 4) {
    route_impl(static_cast<const int32_t*>(ids), n, num_experts, block, out);
  } else if (id_bytes == 8) {
    route_impl(static_cast<const int64_t*>(ids), n, num_experts, block, out);
  } else {
    throw std::invalid_argument("route: expert_indices must be int32 or int64");
  }
}

}  // namespace bsmoe
