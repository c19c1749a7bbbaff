// pybind11 module blocksparse_moe._C: routing and topology ops on raw addresses.
//
// Every function takes tensor.data_ptr() integers, sizes and (CUDA) a stream handle; Python
// (blocksparse_moe/_native.py) allocates the tensors, checks dtypes, shapes and devices, and
// owns the lifetime of every buffer. C++ exceptions map to Python ones: std::invalid_argument
// -> ValueError, std::runtime_error -> RuntimeError. The GIL is released while an op runs.
//
// CPU ops are always compiled; the CUDA ops only when setup.py found nvcc and defined
// BSMOE_WITH_CUDA. build_info() says which, and why not.

#include <pybind11/pybind11.h>

#include <cstdint>

#include "bsmoe.h"

#ifndef BSMOE_CUDA_ARCHS
#define BSMOE_CUDA_ARCHS ""
#endif
#ifndef BSMOE_CCCL_VERSION
#define BSMOE_CCCL_VERSION ""
#endif
#ifndef BSMOE_CUDA_VERSION
#define BSMOE_CUDA_VERSION ""
#endif
#ifndef BSMOE_CUDA_REASON
#define BSMOE_CUDA_REASON "built without setup.py's CUDA detection"
#endif

namespace py = pybind11;
using addr = std::uintptr_t;

namespace {

template <typename T>
T* ptr(addr a) {
  return reinterpret_cast<T*>(a);
}

bsmoe::RouteOut route_out(addr indices, addr bin_ids, addr tokens_per_expert, addr bins, addr padded_bins, addr rows,
                          addr padded_rows) {
  return {ptr<int32_t>(indices), ptr<int32_t>(bin_ids), ptr<int32_t>(tokens_per_expert), ptr<int32_t>(bins),
          ptr<int32_t>(padded_bins), ptr<int32_t>(rows), ptr<int32_t>(padded_rows)};
}

bsmoe::TopologyOut topology_out(addr row_indices, addr column_indices, addr offsets, addr column_indices_t,
                                addr offsets_t, addr block_offsets_t) {
  return {ptr<int32_t>(row_indices),      ptr<int32_t>(column_indices), ptr<int32_t>(offsets),
          ptr<int32_t>(column_indices_t), ptr<int32_t>(offsets_t),      ptr<int32_t>(block_offsets_t)};
}

py::dict build_info() {
  py::dict d;
  d["cpu_ops"] = true;
#ifdef BSMOE_WITH_CUDA
  d["cuda_ops"] = true;
  d["cuda_reason"] = py::none();
#else
  d["cuda_ops"] = false;
  d["cuda_reason"] = BSMOE_CUDA_REASON;
#endif
  d["cuda_archs"] = BSMOE_CUDA_ARCHS;
  d["cuda_version"] = BSMOE_CUDA_VERSION;
  d["cccl_version"] = BSMOE_CCCL_VERSION;
  d["cudart"] = "static";
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                          "." + std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "blocksparse_moe native routing ops (CPU; CUDA when built with nvcc)";
  m.def("build_info", &build_info, "What this build contains: cpu_ops, cuda_ops, archs, CCCL version, ...");

  m.def(
      "route_cpu",
      [](addr ids, int id_bytes, int64_t n, int64_t num_experts, int64_t block, addr indices, addr bin_ids,
         addr tokens_per_expert, addr bins, addr padded_bins, addr rows, addr padded_rows) {
        bsmoe::route_cpu(ptr<const void>(ids), id_bytes, n, num_experts, block,
                         route_out(indices, bin_ids, tokens_per_expert, bins, padded_bins, rows, padded_rows));
      },
      py::call_guard<py::gil_scoped_release>(),
      "route_cpu(ids, id_bytes, n, E, b, indices, bin_ids, tokens_per_expert, bins, padded_bins, rows, padded_rows)");

  m.def(
      "topology_cpu",
      [](addr padded_bins, int pb_bytes, int64_t num_experts, int64_t ffn_hidden_size, int64_t block,
         int64_t padded_tokens, addr row_indices, addr column_indices, addr offsets, addr column_indices_t,
         addr offsets_t, addr block_offsets_t) {
        bsmoe::topology_cpu(
            ptr<const void>(padded_bins), pb_bytes, num_experts, ffn_hidden_size, block, padded_tokens,
            topology_out(row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t));
      },
      py::call_guard<py::gil_scoped_release>(),
      "topology_cpu(padded_bins, pb_bytes, E, F, b, P, row_indices, column_indices, offsets, column_indices_t, "
      "offsets_t, block_offsets_t)");

#ifdef BSMOE_WITH_CUDA
  m.def("route_cuda_temp_bytes", &bsmoe::route_cuda_temp_bytes, py::call_guard<py::gil_scoped_release>(),
        "Bytes of CUB temp storage route_cuda needs: route_cuda_temp_bytes(n, E)");

  m.def(
      "route_cuda",
      [](addr ids, int id_bytes, int64_t n, int64_t num_experts, int64_t block, addr keys_tmp, addr values_tmp,
         addr temp, size_t temp_bytes, addr indices, addr bin_ids, addr tokens_per_expert, addr bins,
         addr padded_bins, addr rows, addr padded_rows, addr stream) {
        bsmoe::route_cuda(ptr<const void>(ids), id_bytes, n, num_experts, block, ptr<void>(keys_tmp),
                          ptr<void>(values_tmp), ptr<void>(temp), temp_bytes,
                          route_out(indices, bin_ids, tokens_per_expert, bins, padded_bins, rows, padded_rows),
                          stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "route_cuda(ids, id_bytes, n, E, b, keys_tmp, values_tmp, temp, temp_bytes, indices, bin_ids, "
      "tokens_per_expert, bins, padded_bins, rows, padded_rows, stream)");

  m.def(
      "topology_cuda",
      [](addr padded_bins, int pb_bytes, int64_t num_experts, int64_t ffn_hidden_size, int64_t block,
         int64_t padded_tokens, addr row_indices, addr column_indices, addr offsets, addr column_indices_t,
         addr offsets_t, addr block_offsets_t, addr stream) {
        bsmoe::topology_cuda(
            ptr<const void>(padded_bins), pb_bytes, num_experts, ffn_hidden_size, block, padded_tokens,
            topology_out(row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t), stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "topology_cuda(padded_bins, pb_bytes, E, F, b, P, row_indices, column_indices, offsets, column_indices_t, "
      "offsets_t, block_offsets_t, stream)");

  m.def(
      "cuda_versions",
      []() {
        int runtime = 0, driver = 0;
        bsmoe::cuda_versions(&runtime, &driver);
        return py::make_tuple(runtime, driver);
      },
      "(CUDA runtime version this build links, installed driver's version or 0)");
#endif
}
