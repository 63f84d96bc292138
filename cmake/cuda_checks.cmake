# The decisions of cmake/cuda.cmake that depend on versions, as functions of
# plain values, so that tests (cmake/cuda_checks_probe.cmake, run by
# tests/op/test_cuda.py) can feed them any CMake, nvcc, torch and
# TORCH_CUDA_ARCH_LIST without installing them.

# First CMake whose NVIDIA-CUDA compiler table knows nvcc's C++20 flag (3.25
# stops with "CUDA20 ... does not know the compile flags").
set(FMNIST_CMAKE_FOR_CUDA20 "3.26")

# nvcc's version ("13.0") and the virtual architectures it can build
# ("75;80;86;...;90;100;..."), from `nvcc --version` / `--list-gpu-arch`.
function(fmnist_nvcc_facts nvcc out_version out_archs)
  execute_process(COMMAND "${nvcc}" --version OUTPUT_VARIABLE _v ERROR_QUIET RESULT_VARIABLE _rc)
  set(_ver "")
  if(_rc EQUAL 0 AND _v MATCHES "release ([0-9]+\\.[0-9]+)")
    set(_ver "${CMAKE_MATCH_1}")
  endif()
  execute_process(COMMAND "${nvcc}" --list-gpu-arch OUTPUT_VARIABLE _a ERROR_QUIET RESULT_VARIABLE _rc)
  set(_archs "")
  if(_rc EQUAL 0)
    string(REGEX MATCHALL "compute_[0-9]+" _found "${_a}")
    foreach(_f IN LISTS _found)
      string(REPLACE "compute_" "" _n "${_f}")
      list(APPEND _archs "${_n}")
    endforeach()
  endif()
  set(${out_version} "${_ver}" PARENT_SCOPE)
  set(${out_archs} "${_archs}" PARENT_SCOPE)
endfunction()

# Why nvcc cannot build the kernels for this CMake and torch ("" if it can).
function(fmnist_cuda_version_blocker cmake_version cxx_std nvcc_version torch_cuda out_why)
  set(_why "")
  if(cxx_std GREATER_EQUAL 20 AND cmake_version VERSION_LESS FMNIST_CMAKE_FOR_CUDA20)
    set(_why "CMake ${cmake_version} cannot compile CUDA as C++${cxx_std}, which this torch "
             "needs: use CMake >= ${FMNIST_CMAKE_FOR_CUDA20} (pip install 'cmake>=${FMNIST_CMAKE_FOR_CUDA20}')")
  elseif(nvcc_version STREQUAL "")
    set(_why "could not read the version of nvcc")
  else()
    string(REGEX MATCH "^[0-9]+" _nv_major "${nvcc_version}")
    string(REGEX MATCH "^[0-9]+" _t_major "${torch_cuda}")
    if(NOT _nv_major STREQUAL _t_major)
      set(_why "nvcc ${nvcc_version} and torch's CUDA ${torch_cuda} differ in major version "
               "(use the CUDA ${_t_major} toolkit: CUDA_HOME or CMAKE_CUDA_COMPILER)")
    endif()
  endif()
  string(CONCAT _why ${_why})
  set(${out_why} "${_why}" PARENT_SCOPE)
endfunction()

# Keeps the entries of a CMAKE_CUDA_ARCHITECTURES list ("70-real;80-real;90")
# that nvcc can build (`supported`: "75;80;..."); `out_dropped` gets the others
# in torch's spelling ("7.0"). An "a"/"f" suffix (9.0a) needs its base.
function(fmnist_filter_cuda_archs archs supported out_kept out_dropped)
  set(_kept "")
  set(_dropped "")
  foreach(_a IN LISTS archs)
    string(REGEX MATCH "^([0-9]+)" _num "${_a}")
    if("${_num}" IN_LIST supported)
      list(APPEND _kept "${_a}")
    else()
      string(REGEX REPLACE "^([0-9]+)([0-9])([af]?).*$" "\\1.\\2\\3" _torch "${_a}")
      list(APPEND _dropped "${_torch}")
    endif()
  endforeach()
  set(${out_kept} "${_kept}" PARENT_SCOPE)
  set(${out_dropped} "${_dropped}" PARENT_SCOPE)
endfunction()

# "80-real;90" -> "sm_80;sm_90;compute_90" (for the build info).
function(fmnist_cuda_archs_str archs out_str)
  set(_str "")
  foreach(_a IN LISTS archs)
    if(_a MATCHES "^([0-9]+[af]?)-real$")
      list(APPEND _str "sm_${CMAKE_MATCH_1}")
    else()
      list(APPEND _str "sm_${_a}" "compute_${_a}")
    endif()
  endforeach()
  set(${out_str} "${_str}" PARENT_SCOPE)
endfunction()

# All of it: in mode ON a blocker is a FATAL_ERROR naming the reason; in AUTO
# out_why gets it (build without CUDA) and unbuildable architectures are
# dropped with a note. out_archs: the architectures to build.
function(fmnist_cuda_decide mode cmake_version cxx_std nvcc_version torch_cuda supported archs
         out_why out_archs)
  fmnist_cuda_version_blocker("${cmake_version}" "${cxx_std}" "${nvcc_version}" "${torch_cuda}" _why)
  set(_kept "")
  if(_why STREQUAL "")
    fmnist_filter_cuda_archs("${archs}" "${supported}" _kept _dropped)
    if(_dropped)
      string(REPLACE ";" " " _d "${_dropped}")
      string(REPLACE ";" " " _s "${supported}")
      if(mode STREQUAL "ON")
        message(FATAL_ERROR "fmnist_ext: FMNIST_CUDA=ON but TORCH_CUDA_ARCH_LIST names "
                            "architecture(s) ${_d} that nvcc ${nvcc_version} cannot build "
                            "(it builds compute capabilities ${_s})")
      endif()
      if(_kept)
        message(STATUS "fmnist_ext: note: dropping CUDA architecture(s) ${_d} from "
                       "TORCH_CUDA_ARCH_LIST: nvcc ${nvcc_version} cannot build them")
      else()
        set(_why "nvcc ${nvcc_version} cannot build any architecture of TORCH_CUDA_ARCH_LIST (${_d})")
      endif()
    endif()
  endif()
  if(NOT _why STREQUAL "" AND mode STREQUAL "ON")
    message(FATAL_ERROR "fmnist_ext: FMNIST_CUDA=ON but the CUDA kernels cannot be built: ${_why}")
  endif()
  set(${out_why} "${_why}" PARENT_SCOPE)
  set(${out_archs} "${_kept}" PARENT_SCOPE)
endfunction()
