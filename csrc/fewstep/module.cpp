// The extension module fewstep._C: loading it registers the fewstep op library
// (schemas in each op's folder via TORCH_LIBRARY_FRAGMENT) and exposes build information.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fewstep, m) {}

#ifndef FEWSTEP_CUDA_ARCHS
#define FEWSTEP_CUDA_ARCHS ""
#define FEWSTEP_CUDA_VERSION ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fewstep compiled kernels; ops live in torch.ops.fewstep";
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch"] = FEWSTEP_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(FEWSTEP_WITH_CUDA);
    info["cuda_version"] = FEWSTEP_CUDA_VERSION;
    info["cuda_archs"] = FEWSTEP_CUDA_ARCHS;
    info["compiler"] = FEWSTEP_COMPILER;
    info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#ifdef _OPENMP
    info["openmp"] = true;  // the CPU kernels' at::parallel_for loops run on torch's threads
#else
    info["openmp"] = false;
#endif
    return info;
  }, "How this extension was built: torch version, CUDA on/off and version, archs, compiler, OpenMP.");
}
