// Shared declarations of blocksparse_moe._C: the routing and topology ops, CPU and CUDA.
//
// The extension does not link libtorch. Python allocates every buffer with torch and passes
// raw addresses (tensor.data_ptr()), sizes and, on CUDA, the stream
// (torch.cuda.current_stream().cuda_stream). All outputs are int32; all index arithmetic is
// int64 so that an int32 overflow is caught on the host instead of wrapping.
//
// The per-element formulas live here as BSMOE_HD inline functions compiled by both g++ and
// nvcc, so the CPU ops (which CI runs) execute the very arithmetic the CUDA kernels run.

#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define BSMOE_HD __host__ __device__ __forceinline__
#else
#define BSMOE_HD inline
#endif

namespace bsmoe {

// Output buffers of route (see blocksparse_moe/routing.py for the definitions).
struct RouteOut {
  int32_t* indices;            // [n] slot stored at each sorted position
  int32_t* bin_ids;            // [n] expert of each sorted position
  int32_t* tokens_per_expert;  // [E]
  int32_t* bins;               // [E] inclusive cumsum of tokens_per_expert
  int32_t* padded_bins;        // [E] inclusive cumsum of tokens_per_expert rounded up to b
  int32_t* rows;               // [n] sorted row of each slot (inverse of indices)
  int32_t* padded_rows;        // [n] row of each slot in the padded layout
};

// Output buffers of the P x (E*F) topology (see blocksparse_moe/topology.py).
struct TopologyOut {
  int32_t* row_indices;       // [nnz]
  int32_t* column_indices;    // [nnz]
  int32_t* offsets;           // [P/b + 1]
  int32_t* column_indices_t;  // [nnz]
  int32_t* offsets_t;         // [E*F/b + 1]
  int32_t* block_offsets_t;   // [nnz]
};

// ---- shared per-element math (host and device) ------------------------------------------

// Rows a group of `count` slots takes once padded to a multiple of `block`.
BSMOE_HD int64_t round_up(int64_t count, int64_t block) { return (count + block - 1) / block * block; }

// Padded row of the slot at sorted position p, whose expert e has `count` slots, inclusive
// cumsum `bin_end` and padded inclusive cumsum `padded_end`.
BSMOE_HD int64_t padded_row_of(int64_t p, int64_t count, int64_t bin_end, int64_t padded_end, int64_t block) {
  return p - (bin_end - count) + (padded_end - round_up(count, block));
}

// The expert owning padded row `row`: the first e with padded_bins[e] > row. The result is
// clamped to [0, E) so that malformed padded_bins can never produce an out-of-range address.
template <typename Pb>
BSMOE_HD int64_t expert_of_row(const Pb* padded_bins, int64_t num_experts, int64_t row) {
  int64_t lo = 0, hi = num_experts - 1;  // answer in [lo, hi]
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(padded_bins[mid]) > row) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Writes every topology field whose index is i (i ranges over max(nnz, P/b+1, E*F/b+1)).
//
// The MoE topology has a closed form. Block row r belongs to expert e(r) and holds the fb =
// F/b blocks of columns e*fb .. e*fb+fb-1, so in row-major order block i is (r, j) =
// (i / fb, i % fb). Expert e owns block rows [s_e, s_e + n_e). In column-major order its
// columns come one after another, each listing rows s_e .. s_e+n_e-1, and expert e's blocks
// occupy positions [s_e*fb, (s_e+n_e)*fb) in *both* orders, so position q of the column-major
// order also belongs to e(q / fb), and within it column j = local / n_e, row s_e + local % n_e.
template <typename Pb>
BSMOE_HD void topology_element(int64_t i, const Pb* padded_bins, int64_t num_experts, int64_t fb,
                               int64_t block, int64_t block_rows, int64_t nnz, const TopologyOut& o) {
  if (i < nnz) {
    const int64_t r = i / fb, j = i % fb;
    const int64_t e = expert_of_row(padded_bins, num_experts, r * block);
    const int64_t start = (e > 0 ? static_cast<int64_t>(padded_bins[e - 1]) : 0) / block;
    const int64_t n_e = static_cast<int64_t>(padded_bins[e]) / block - start;
    o.row_indices[i] = static_cast<int32_t>(r);
    o.column_indices[i] = static_cast<int32_t>(e * fb + j);
    // Same expert for position q = i of the column-major order (see above).
    if (n_e > 0) {
      const int64_t local = i - start * fb;
      const int64_t row_t = start + local % n_e;
      o.column_indices_t[i] = static_cast<int32_t>(row_t);
      o.block_offsets_t[i] = static_cast<int32_t>(row_t * fb + local / n_e);
    } else {  // only reachable with malformed padded_bins (checked on the host)
      o.column_indices_t[i] = -1;
      o.block_offsets_t[i] = -1;
    }
  }
  if (i <= block_rows) o.offsets[i] = static_cast<int32_t>(i * fb);
  const int64_t columns = num_experts * fb;
  if (i <= columns) {
    if (i == columns) {
      o.offsets_t[i] = static_cast<int32_t>(nnz);
    } else {
      const int64_t e = i / fb, j = i % fb;
      const int64_t start = (e > 0 ? static_cast<int64_t>(padded_bins[e - 1]) : 0) / block;
      const int64_t n_e = static_cast<int64_t>(padded_bins[e]) / block - start;
      o.offsets_t[i] = static_cast<int32_t>(start * fb + j * n_e);
    }
  }
}

// Number of indices topology_element must visit.
inline int64_t topology_work_items(int64_t nnz, int64_t block_rows, int64_t columns) {
  int64_t w = nnz;
  if (block_rows + 1 > w) w = block_rows + 1;
  if (columns + 1 > w) w = columns + 1;
  return w;
}

// ---- CPU ops (csrc/cpu/*.cpp) -------------------------------------------------------------

// ids: [n] int32 (id_bytes == 4) or int64 (id_bytes == 8). Throws std::invalid_argument
// (ValueError in Python) for an id outside [0, E) before writing any output.
void route_cpu(const void* ids, int id_bytes, int64_t n, int64_t num_experts, int64_t block, const RouteOut& out);

// padded_bins: [E] int32/int64. Throws std::invalid_argument when padded_bins is not a
// non-decreasing sequence of multiples of block ending at padded_tokens.
void topology_cpu(const void* padded_bins, int pb_bytes, int64_t num_experts, int64_t ffn_hidden_size,
                  int64_t block, int64_t padded_tokens, const TopologyOut& out);

// ---- CUDA ops (csrc/cuda/*.cu), compiled when BSMOE_WITH_CUDA is defined --------------------
#ifdef BSMOE_WITH_CUDA

// Bytes of CUB temporary storage route_cuda needs for n slots and E experts.
size_t route_cuda_temp_bytes(int64_t n, int64_t num_experts);

// keys_tmp, values_tmp: [n] int32 scratch; temp: route_cuda_temp_bytes(n, E) bytes.
// Every launch goes to `stream`; nothing synchronizes. Throws std::runtime_error on a CUDA
// error. Ids are range-checked on the host before the call; the kernels clamp them so that a
// bad id can never address memory.
void route_cuda(const void* ids, int id_bytes, int64_t n, int64_t num_experts, int64_t block, void* keys_tmp,
                void* values_tmp, void* temp, size_t temp_bytes, const RouteOut& out, std::uintptr_t stream);

// One kernel launch writes every field. padded_tokens (P) was read back to the host by the
// caller to size the outputs; padded_bins was validated there in the same read.
void topology_cuda(const void* padded_bins, int pb_bytes, int64_t num_experts, int64_t ffn_hidden_size,
                   int64_t block, int64_t padded_tokens, const TopologyOut& out, std::uintptr_t stream);

// (runtime version, driver version) as cudaRuntimeGetVersion / cudaDriverGetVersion report
// them; the driver version is 0 when no driver is installed.
void cuda_versions(int* runtime_version, int* driver_version);

#endif  // BSMOE_WITH_CUDA

}  // namespace bsmoe
