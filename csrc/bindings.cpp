// Python bindings for packdit._C.
//
// Functions take raw addresses (tensor.data_ptr()) and sizes, so the module
// does not depend on libtorch or its C++ ABI. Inputs are validated by the
// Python callers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "packdit/build_config.h"
#include "packdit/layout.h"
#include "packdit/patchify.h"
#include "packdit/planner.h"

namespace py = pybind11;

namespace {

// Bump when a function signature or its semantics change; packdit/_ext.py
// refuses to load a module with a different value.
constexpr int kAbiVersion = 2;

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// A NumPy int64 array that owns `values` (moved, not copied).
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& values) {
  auto* owned = new std::vector<int64_t>(std::move(values));
  py::capsule free_when_done(owned, [](void* v) { delete static_cast<std::vector<int64_t>*>(v); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())}, owned->data(), free_when_done);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "packdit native kernels (raw-pointer interface, no libtorch dependency)";
  m.attr("ABI_VERSION") = kAbiVersion;
#ifdef PACKDIT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("CUDA_ARCHS") = PACKDIT_CUDA_ARCHS;

  m.def(
      "layout_positions_cpu",
      [](std::uintptr_t cu_seqlens, std::uintptr_t grid, std::uintptr_t token_index,
         int64_t num_segments, int64_t num_tokens, std::uintptr_t segment_ids,
         std::uintptr_t positions) {
        packdit::layout_positions_cpu(ptr<const int32_t>(cu_seqlens), ptr<const int32_t>(grid),
                                      ptr<const int32_t>(token_index), num_segments,
                                      num_tokens, ptr<int32_t>(segment_ids),
                                      ptr<int32_t>(positions));
      },
      py::arg("cu_seqlens_ptr"), py::arg("grid_ptr"), py::arg("token_index_ptr"),
      py::arg("num_segments"), py::arg("num_tokens"), py::arg("segment_ids_ptr"),
      py::arg("positions_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Segment ids and (t, h, w) positions of packed tokens on the host. "
      "token_index_ptr = 0 means tokens are in raster order.");

  m.def(
      "plan_lookahead",
      [](std::uintptr_t lengths, std::uintptr_t costs, std::uintptr_t alltoall, std::uintptr_t keys,
         int64_t num_samples, int64_t capacity, int64_t ranks, int64_t window,
         const std::vector<int64_t>& sp_sizes) {
        packdit::PackPlan plan;
        {
          py::gil_scoped_release no_gil;
          plan = packdit::plan_lookahead(ptr<const int64_t>(lengths), ptr<const double>(costs),
                                         ptr<const double>(alltoall), ptr<const uint64_t>(keys),
                                         num_samples, capacity, ranks, window, sp_sizes);
        }
        return py::make_tuple(to_numpy(std::move(plan.order)), to_numpy(std::move(plan.bin_offsets)),
                              to_numpy(std::move(plan.bin_sizes)));
      },
      py::arg("lengths_ptr"), py::arg("costs_ptr"), py::arg("alltoall_ptr"), py::arg("keys_ptr"),
      py::arg("num_samples"), py::arg("capacity"), py::arg("ranks"), py::arg("window"), py::arg("sp_sizes"),
      "Lookahead LPT packing plan with sequence-parallel groups of int64 lengths, float64 costs and "
      "all-to-all costs and uint64 tie keys (host arrays); returns (order, bin_offsets, bin_sizes) int64 "
      "arrays, see packdit/packing/planner.py.");

#ifdef PACKDIT_WITH_CUDA
  m.def(
      "layout_positions_cuda",
      [](std::uintptr_t cu_seqlens, std::uintptr_t grid, std::uintptr_t token_index,
         int64_t num_segments, int64_t num_tokens, std::uintptr_t segment_ids,
         std::uintptr_t positions, std::uintptr_t stream) {
        packdit::layout_positions_cuda(ptr<const int32_t>(cu_seqlens), ptr<const int32_t>(grid),
                                       ptr<const int32_t>(token_index), num_segments,
                                       num_tokens, ptr<int32_t>(segment_ids),
                                       ptr<int32_t>(positions),
                                       reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("cu_seqlens_ptr"), py::arg("grid_ptr"), py::arg("token_index_ptr"),
      py::arg("num_segments"), py::arg("num_tokens"), py::arg("segment_ids_ptr"),
      py::arg("positions_ptr"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "CUDA version of layout_positions_cpu; launches on `stream` "
      "(torch.cuda.current_stream().cuda_stream). Raises RuntimeError if the launch fails.");

  const auto patch_copy = [](bool to_tokens) {
    return [to_tokens](std::uintptr_t desc, std::uintptr_t segment_ids, std::uintptr_t raster_index,
                       int64_t num_tokens, int64_t channels, int32_t pt, int32_t ph, int32_t pw,
                       int32_t elem_size, bool channels_last, std::uintptr_t tokens,
                       std::uintptr_t stream) {
      const packdit::PatchGeometry geometry{num_tokens, channels, pt, ph, pw, elem_size, channels_last};
      if (to_tokens) {
        packdit::patchify_cuda(ptr<const int64_t>(desc), ptr<const int32_t>(segment_ids),
                               ptr<const int64_t>(raster_index), geometry, ptr<void>(tokens),
                               reinterpret_cast<cudaStream_t>(stream));
      } else {
        packdit::unpatchify_cuda(ptr<const int64_t>(desc), ptr<const int32_t>(segment_ids),
                                 ptr<const int64_t>(raster_index), geometry, ptr<const void>(tokens),
                                 reinterpret_cast<cudaStream_t>(stream));
      }
    };
  };
  for (const bool to_tokens : {true, false}) {
    m.def(to_tokens ? "patchify_cuda" : "unpatchify_cuda", patch_copy(to_tokens), py::arg("desc_ptr"),
          py::arg("segment_ids_ptr"), py::arg("raster_index_ptr"), py::arg("num_tokens"),
          py::arg("channels"), py::arg("pt"), py::arg("ph"), py::arg("pw"), py::arg("elem_size"),
          py::arg("channels_last"), py::arg("tokens_ptr"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>(),
          to_tokens ? "Gather packed samples (int64 descriptor table, see patchify.h) into tokens (N, F)."
                    : "Scatter tokens (N, F) into the samples of the descriptor table (see patchify.h).");
  }
#endif
}
