// Python bindings for packdit._C.
//
// Functions take raw addresses (tensor.data_ptr()) and sizes, so the module
// does not depend on libtorch or its C++ ABI. Inputs are validated by the
// Python callers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "packdit/build_config.h"
#include "packdit/layout.h"

namespace py = pybind11;

namespace {

// Bump when a function signature or its semantics change; packdit/_ext.py
// refuses to load a module with a different value.
constexpr int kAbiVersion = 1;

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
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
#endif
}
