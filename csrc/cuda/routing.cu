// CUDA routing and topology, same results as csrc/cpu/*.cpp.
//
// route_cuda, all on the caller's stream, no synchronization:
//   1. cudaMemsetAsync(tokens_per_expert)
//   2. prepare_kernel: keys = expert id (clamped), values = slot (iota), histogram with int
//      atomics (shared-memory partial histograms when E fits; integer atomics are exact, so the
//      result is deterministic)
//   3. cub::DeviceRadixSort::SortPairs on (key, slot) over the low ceil(log2 E) bits only:
//      a stable LSD radix sort, so slots of one expert keep slot order -> bin_ids, indices
//   4. bins_kernel (one block): inclusive cumsums bins and padded_bins
//   5. rows_kernel: rows[indices[p]] = p, padded_rows[indices[p]] = padded row of p
// Why CUB and not a counting sort: a stable counting sort on the GPU needs a per-tile rank of
// each slot among same-expert slots (warp match/ballot ranking plus a tile x expert scan),
// which is exactly what CUB's onesweep radix sort already implements, tuned per arch; with
// end_bit = ceil(log2 E) it takes 1 pass for E <= 256. Compile time is kept down by a single
// instantiation: unsigned int keys, int values, int item count (the query and the sort share it).
//
// topology_cuda: one kernel; thread i writes every field with index i (bsmoe.h,
// topology_element, the same code the CPU op runs).
//
// Every launch is followed by a cudaGetLastError check; errors become std::runtime_error,
// which pybind11 raises as RuntimeError.

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <stdexcept>
#include <string>

#include "../bsmoe.h"

namespace bsmoe {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;        // grid-stride loops cover the rest
constexpr int kScanThreads = 1024;      // bins_kernel block size
constexpr int64_t kSharedHistMax = 8192;  // experts whose partial histogram fits in 32 KiB

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("blocksparse_moe._C: ") + what + " failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

int grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<int>(blocks);
}

// Bits the radix sort looks at: keys lie in [0, E).
int sort_end_bit(int64_t num_experts) {
  int bits = 1;
  while (bits < 31 && (int64_t{1} << bits) < num_experts) ++bits;
  return bits;
}

template <typename Id>
__global__ void prepare_kernel(const Id* __restrict__ ids, int64_t n, int64_t num_experts, bool shared_hist,
                               unsigned int* __restrict__ keys, int* __restrict__ values,
                               int32_t* __restrict__ counts) {
  extern __shared__ int32_t hist[];
  if (shared_hist) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t e = static_cast<int64_t>(ids[i]);
    // Ids were range-checked on the host; the clamp only guarantees a bad id never addresses memory.
    e = e < 0 ? 0 : (e >= num_experts ? num_experts - 1 : e);
    keys[i] = static_cast<unsigned int>(e);
    values[i] = static_cast<int>(i);
    if (shared_hist) atomicAdd(&hist[e], 1); else atomicAdd(&counts[e], 1);
  }
  if (shared_hist) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
      if (hist[e]) atomicAdd(&counts[e], hist[e]);
    }
  }
}

// One block: inclusive cumsums of counts and of counts rounded up to the block size, in
// chunks of kScanThreads with a running carry (Hillis-Steele scan in shared memory).
__global__ void bins_kernel(const int32_t* __restrict__ counts, int64_t num_experts, int64_t block,
                            int32_t* __restrict__ bins, int32_t* __restrict__ padded_bins) {
  __shared__ long long s_bins[kScanThreads];
  __shared__ long long s_padded[kScanThreads];
  const int t = threadIdx.x;
  long long carry = 0, padded_carry = 0;
  for (int64_t base = 0; base < num_experts; base += kScanThreads) {
    const int64_t e = base + t;
    const long long c = e < num_experts ? counts[e] : 0;
    s_bins[t] = c;
    s_padded[t] = round_up(c, block);
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {
      const long long a = t >= off ? s_bins[t - off] : 0;
      const long long b = t >= off ? s_padded[t - off] : 0;
      __syncthreads();
      s_bins[t] += a;
      s_padded[t] += b;
      __syncthreads();
    }
    if (e < num_experts) {
      bins[e] = static_cast<int32_t>(carry + s_bins[t]);
      padded_bins[e] = static_cast<int32_t>(padded_carry + s_padded[t]);
    }
    carry += s_bins[kScanThreads - 1];
    padded_carry += s_padded[kScanThreads - 1];
    __syncthreads();  // the next chunk overwrites the shared arrays
  }
}

__global__ void rows_kernel(const int32_t* __restrict__ indices, const int32_t* __restrict__ bin_ids,
                            const int32_t* __restrict__ counts, const int32_t* __restrict__ bins,
                            const int32_t* __restrict__ padded_bins, int64_t n, int64_t num_experts, int64_t block,
                            int32_t* __restrict__ rows, int32_t* __restrict__ padded_rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n; p += stride) {
    const int64_t s = indices[p];
    const int64_t e = bin_ids[p];
    if (s < 0 || s >= n || e < 0 || e >= num_experts) continue;  // impossible: indices is a permutation
    rows[s] = static_cast<int32_t>(p);
    padded_rows[s] = static_cast<int32_t>(padded_row_of(p, counts[e], bins[e], padded_bins[e], block));
  }
}

template <typename Pb>
__global__ void topology_kernel(const Pb* __restrict__ padded_bins, int64_t num_experts, int64_t fb, int64_t block,
                                int64_t block_rows, int64_t nnz, int64_t work, TopologyOut out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < work; i += stride) {
    topology_element(i, padded_bins, num_experts, fb, block, block_rows, nnz, out);
  }
}

// The single CUB instantiation (query and sort both go through it).
cudaError_t radix_sort(void* temp, size_t& temp_bytes, const unsigned int* keys_in, unsigned int* keys_out,
                       const int* values_in, int* values_out, int n, int end_bit, cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, n, 0, end_bit,
                                         stream);
}

void check_route_sizes(int64_t n, int64_t num_experts, int64_t block, int id_bytes) {
  if (n < 0 || n > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("route: T*k = " + std::to_string(n) + " slots do not fit int32 indices");
  }
  if (num_experts < 1 || num_experts > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("route: num_experts must lie in [1, 2^31)");
  }
  if (block < 1) throw std::invalid_argument("route: block_size must be >= 1");
  if (id_bytes != 4 && id_bytes != 8) throw std::invalid_argument("route: expert_indices must be int32 or int64");
}

}  // namespace

size_t route_cuda_temp_bytes(int64_t n, int64_t num_experts) {
  check_route_sizes(n, num_experts, 1, 4);
  if (n == 0) return 0;
  size_t bytes = 0;
  check_cuda(radix_sort(nullptr, bytes, nullptr, nullptr, nullptr, nullptr, static_cast<int>(n),
                        sort_end_bit(num_experts), nullptr),
             "cub::DeviceRadixSort::SortPairs (temp storage query)");
  return bytes;
}

void route_cuda(const void* ids, int id_bytes, int64_t n, int64_t num_experts, int64_t block, void* keys_tmp,
                void* values_tmp, void* temp, size_t temp_bytes, const RouteOut& o, std::uintptr_t stream_handle) {
  check_route_sizes(n, num_experts, block, id_bytes);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  check_cuda(cudaMemsetAsync(o.tokens_per_expert, 0, sizeof(int32_t) * num_experts, stream),
             "cudaMemsetAsync(tokens_per_expert)");
  if (n > 0) {
    const bool shared_hist = num_experts <= kSharedHistMax;
    const size_t shmem = shared_hist ? sizeof(int32_t) * num_experts : 0;
    const int grid = grid_for(n, kThreads);
    auto* keys = static_cast<unsigned int*>(keys_tmp);
    auto* values = static_cast<int*>(values_tmp);
    if (id_bytes == 4) {
      prepare_kernel<<<grid, kThreads, shmem, stream>>>(static_cast<const int32_t*>(ids), n, num_experts,
                                                         shared_hist, keys, values, o.tokens_per_expert);
    } else {
      prepare_kernel<<<grid, kThreads, shmem, stream>>>(static_cast<const int64_t*>(ids), n, num_experts,
                                                         shared_hist, keys, values, o.tokens_per_expert);
    }
    check_cuda(cudaGetLastError(), "prepare_kernel launch");

    size_t needed = 0;
    const int end_bit = sort_end_bit(num_experts);
    check_cuda(radix_sort(nullptr, needed, keys, nullptr, values, nullptr, static_cast<int>(n), end_bit, stream),
               "cub::DeviceRadixSort::SortPairs (temp storage query)");
    if (temp == nullptr || temp_bytes < needed) {
      throw std::invalid_argument("route: CUB temp storage of " + std::to_string(temp_bytes) + " bytes, need " +
                                  std::to_string(needed));
    }
    size_t available = temp_bytes;
    check_cuda(radix_sort(temp, available, keys, reinterpret_cast<unsigned int*>(o.bin_ids), values,
                          reinterpret_cast<int*>(o.indices), static_cast<int>(n), end_bit, stream),
               "cub::DeviceRadixSort::SortPairs");
  }
  bins_kernel<<<1, kScanThreads, 0, stream>>>(o.tokens_per_expert, num_experts, block, o.bins, o.padded_bins);
  check_cuda(cudaGetLastError(), "bins_kernel launch");
  if (n > 0) {
    rows_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(o.indices, o.bin_ids, o.tokens_per_expert, o.bins,
                                                                 o.padded_bins, n, num_experts, block, o.rows,
                                                                 o.padded_rows);
    check_cuda(cudaGetLastError(), "rows_kernel launch");
  }
}

void topology_cuda(const void* padded_bins, int pb_bytes, int64_t num_experts, int64_t ffn_hidden_size,
                   int64_t block, int64_t padded_tokens, const TopologyOut& out, std::uintptr_t stream_handle) {
  if (num_experts < 1) throw std::invalid_argument("make_topology: num_experts must be >= 1");
  if (block < 1 || ffn_hidden_size < 1 || ffn_hidden_size % block != 0) {
    throw std::invalid_argument("make_topology: ffn_hidden_size must be a positive multiple of block_size");
  }
  if (padded_tokens < 0 || padded_tokens % block != 0) {
    throw std::invalid_argument("make_topology: P is not a non-negative multiple of block_size");
  }
  const int64_t fb = ffn_hidden_size / block;
  const int64_t block_rows = padded_tokens / block;
  const int64_t nnz = block_rows * fb;
  const int64_t int32_max = std::numeric_limits<int32_t>::max();
  if (nnz > int32_max || num_experts * fb >= int32_max) {
    throw std::invalid_argument("make_topology: the topology has more blocks than int32 indices can address");
  }
  const int64_t work = topology_work_items(nnz, block_rows, num_experts * fb);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int grid = grid_for(work, kThreads);
  if (pb_bytes == 4) {
    topology_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const int32_t*>(padded_bins), num_experts, fb, block,
                                                   block_rows, nnz, work, out);
  } else if (pb_bytes == 8) {
    topology_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const int64_t*>(padded_bins), num_experts, fb, block,
                                                   block_rows, nnz, work, out);
  } else {
    throw std::invalid_argument("make_topology: padded_bins must be int32 or int64");
  }
  check_cuda(cudaGetLastError(), "topology_kernel launch");
}

void cuda_versions(int* runtime_version, int* driver_version) {
  *runtime_version = 0;
  *driver_version = 0;
  check_cuda(cudaRuntimeGetVersion(runtime_version), "cudaRuntimeGetVersion");
  // No driver installed is not an error here: the version stays 0 and Python falls back.
  if (cudaDriverGetVersion(driver_version) != cudaSuccess) *driver_version = 0;
  (void)cudaGetLastError();  // clear it, so that no later launch check reports it
}

}  // namespace bsmoe
