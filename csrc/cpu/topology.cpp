// CPU topology build: validates padded_bins, then writes every field with the per-element
// closed form shared with the CUDA kernel (bsmoe.h, topology_element).

#include <limits>
#include <stdexcept>
#include <string>

#include "../bsmoe.h"

namespace bsmoe {
namespace {

template <typename Pb>
void topology_impl(const Pb* pb, int64_t num_experts, int64_t fb, int64_t block, int64_t padded_tokens,
                   const TopologyOut& o) {
  int64_t prev = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t v = static_cast<int64_t>(pb[e]);
    if (v < prev || v % block != 0) {
      throw std::invalid_argument("make_topology: padded_bins must be non-decreasing multiples of block_size (" +
                                  std::to_string(block) + "), got " + std::to_string(v) + " at index " +
                                  std::to_string(e) + " after " + std::to_string(prev));
    }
    prev = v;
  }
  if (prev != padded_tokens) {
    throw std::invalid_argument("make_topology: padded_bins ends at " + std::to_string(prev) + ", expected " +
                                std::to_string(padded_tokens));
  }
  const int64_t block_rows = padded_tokens / block;
  const int64_t nnz = block_rows * fb;
  const int64_t work = topology_work_items(nnz, block_rows, num_experts * fb);
  for (int64_t i = 0; i < work; ++i) topology_element(i, pb, num_experts, fb, block, block_rows, nnz, o);
}

}  // namespace

void topology_cpu(const void* padded_bins, int pb_bytes, int64_t num_experts, int64_t ffn_hidden_size,
                  int64_t block, int64_t padded_tokens, const TopologyOut& out) {
  if (num_experts < 1) throw std::invalid_argument("make_topology: num_experts must be >= 1");
  if (block < 1 || ffn_hidden_size < 1 || ffn_hidden_size % block != 0) {
    throw std::invalid_argument("make_topology: ffn_hidden_size (" + std::to_string(ffn_hidden_size) +
                                ") must be a positive multiple of block_size (" + std::to_string(block) + ")");
  }
  if (padded_tokens < 0 || padded_tokens % block != 0) {
    throw std::invalid_argument("make_topology: P = " + std::to_string(padded_tokens) +
                                " is not a non-negative multiple of block_size");
  }
  const int64_t fb = ffn_hidden_size / block;
  const int64_t int32_max = std::numeric_limits<int32_t>::max();
  if ((padded_tokens / block) * fb > int32_max || num_experts * fb >= int32_max) {
    throw std::invalid_argument("make_topology: the topology has more blocks than int32 indices can address");
  }
  if (pb_bytes == 4) {
    topology_impl(static_cast<const int32_t*>(padded_bins), num_experts, fb, block, padded_tokens, out);
  } else if (pb_bytes == 8) {
    topology_impl(static_cast<const int64_t*>(padded_bins), num_experts, fb, block, padded_tokens, out);
  } else {
    throw std::invalid_argument("make_topology: padded_bins must be int32 or int64");
  }
}

}  // namespace bsmoe
