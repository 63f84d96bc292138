# Test entry point for cmake/cuda_checks.cmake (tests/op/test_cuda.py):
#   cmake -DMODE=AUTO|ON -DCMAKE_VER=3.25.1 -DCXX_STD=20 -DTORCH_CUDA=13.0
#         -DARCHS="70-real;80-real;90" [-DNVCC=/path/nvcc | -DNVCC_VERSION=13.0
#         -DSUPPORTED="75;80;90"] -P cmake/cuda_checks_probe.cmake
# prints "WHY=<reason or empty>" and "ARCHS=<kept>"; ON-mode blockers are
# fatal errors (non-zero exit).
include("${CMAKE_CURRENT_LIST_DIR}/cuda_checks.cmake")
if(DEFINED NVCC)
  fmnist_nvcc_facts("${NVCC}" NVCC_VERSION SUPPORTED)
endif()
fmnist_cuda_decide("${MODE}" "${CMAKE_VER}" "${CXX_STD}" "${NVCC_VERSION}" "${TORCH_CUDA}"
                   "${SUPPORTED}" "${ARCHS}" _why _archs)
message("WHY=${_why}")
message("ARCHS=${_archs}")
