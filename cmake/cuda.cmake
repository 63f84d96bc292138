# CUDA kernels of fmnist_ext: decides FMNIST_WITH_CUDA and, when on, adds
# csrc/cuda/*.cu to fmnist_ext_C. Included from CMakeLists.txt after the
# target and the torch facts (TORCH_CUDA_VERSION, TORCH_LIBRARY_DIRS, ...).
#
#   FMNIST_CUDA = AUTO | ON | OFF (cache variable, or environment variable of
#     the same name, which wins): AUTO builds the CUDA kernels when torch was
#     built with CUDA and nvcc is found; ON fails with the reason when that is
#     impossible; OFF never builds them.
#   TORCH_CUDA_ARCH_LIST (environment or cache), torch's format: "8.0;9.0+PTX",
#     "8.6 9.0", "9.0a", or names (Ampere, Ada, Hopper, Blackwell). Default:
#     SASS for sm_80 and sm_90 plus compute_90 PTX that newer GPUs JIT-compile.
#   nvcc is looked up as: CMAKE_CUDA_COMPILER, $CUDACXX, $CUDA_HOME/bin/nvcc,
#     $CUDA_PATH/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc.
#   An architecture the found nvcc cannot build (7.0 with nvcc 13) is dropped
#     with a note in AUTO and is an error in ON; so is an nvcc whose major
#     version differs from torch's CUDA, or a CMake too old to compile CUDA
#     as C++20 (torch >= 2.13): AUTO builds without CUDA and says why.
#   FMNIST_CUDA_PTXAS_VERBOSE=ON prints ptxas register/spill figures.
#
# Sets FMNIST_WITH_CUDA (ON/OFF) and FMNIST_CUDA_ARCHS_STR (for _build_info.py).
set(FMNIST_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
set_property(CACHE FMNIST_CUDA PROPERTY STRINGS AUTO ON OFF)
if(DEFINED ENV{FMNIST_CUDA} AND NOT "$ENV{FMNIST_CUDA}" STREQUAL "")
  set(FMNIST_CUDA "$ENV{FMNIST_CUDA}")
endif()
string(TOUPPER "${FMNIST_CUDA}" FMNIST_CUDA)
if(FMNIST_CUDA MATCHES "^(1|TRUE|YES)$")
  set(FMNIST_CUDA ON)
elseif(FMNIST_CUDA MATCHES "^(0|FALSE|NO)$")
  set(FMNIST_CUDA OFF)
endif()
if(NOT FMNIST_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "fmnist_ext: FMNIST_CUDA must be AUTO, ON or OFF, got '${FMNIST_CUDA}'")
endif()
option(FMNIST_CUDA_PTXAS_VERBOSE "Print ptxas register/spill info for the CUDA kernels" OFF)

file(GLOB FMNIST_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")

# Returns (in _why) why CUDA kernels cannot be built, empty when they can.
function(_fmnist_cuda_blocker out_why out_nvcc)
  set(${out_nvcc} "" PARENT_SCOPE)
  if(NOT FMNIST_CUDA_SOURCES)
    set(${out_why} "no CUDA kernel sources in csrc/cuda" PARENT_SCOPE)
    return()
  endif()
  if("${TORCH_CUDA_VERSION}" STREQUAL "")
    set(${out_why} "torch ${TORCH_VERSION} was built without CUDA" PARENT_SCOPE)
    return()
  endif()
  set(_cands "")
  if(CMAKE_CUDA_COMPILER)
    list(APPEND _cands "${CMAKE_CUDA_COMPILER}")
  endif()
  if(DEFINED ENV{CUDACXX} AND NOT "$ENV{CUDACXX}" STREQUAL "")
    list(APPEND _cands "$ENV{CUDACXX}")
  endif()
  foreach(_v CUDA_HOME CUDA_PATH)
    if(DEFINED ENV{${_v}} AND NOT "$ENV{${_v}}" STREQUAL "")
      list(APPEND _cands "$ENV{${_v}}/bin/nvcc")
    endif()
  endforeach()
  find_program(_fmnist_nvcc_on_path nvcc)
  if(_fmnist_nvcc_on_path)
    list(APPEND _cands "${_fmnist_nvcc_on_path}")
  endif()
  list(APPEND _cands "/usr/local/cuda/bin/nvcc")
  foreach(_c IN LISTS _cands)
    if(EXISTS "${_c}" AND NOT IS_DIRECTORY "${_c}")
      set(${out_nvcc} "${_c}" PARENT_SCOPE)
      set(${out_why} "" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  set(${out_why} "nvcc not found (set CUDA_HOME or CMAKE_CUDA_COMPILER)" PARENT_SCOPE)
endfunction()

# TORCH_CUDA_ARCH_LIST -> CMAKE_CUDA_ARCHITECTURES ("80-real;90") and a
# readable string ("sm_80;sm_90;compute_90").
function(_fmnist_cuda_archs in out_cmake out_str)
  string(REPLACE " " ";" _items "${in}")
  string(REPLACE "," ";" _items "${_items}")
  set(_names_Ampere "8.0;8.6+PTX")
  set(_names_Ada "8.9+PTX")
  set(_names_Hopper "9.0+PTX")
  set(_names_Blackwell "10.0;12.0+PTX")
  set(_cm "")
  set(_str "")
  foreach(_it IN LISTS _items)
    if(_it STREQUAL "")
      continue()
    endif()
    if(DEFINED _names_${_it})
      set(_sub "${_names_${_it}}")
    else()
      set(_sub "${_it}")
    endif()
    foreach(_a IN LISTS _sub)
      if(NOT _a MATCHES "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$")
        message(FATAL_ERROR "fmnist_ext: cannot parse '${_a}' in TORCH_CUDA_ARCH_LIST='${in}' "
                            "(expected e.g. 8.0;9.0+PTX)")
      endif()
      set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      if(CMAKE_MATCH_4)
        list(APPEND _cm "${_num}")
        list(APPEND _str "sm_${_num}" "compute_${_num}")
      else()
        list(APPEND _cm "${_num}-real")
        list(APPEND _str "sm_${_num}")
      endif()
    endforeach()
  endforeach()
  list(REMOVE_DUPLICATES _cm)
  list(REMOVE_DUPLICATES _str)
  if(NOT _cm)
    message(FATAL_ERROR "fmnist_ext: TORCH_CUDA_ARCH_LIST='${in}' names no architecture")
  endif()
  set(${out_cmake} "${_cm}" PARENT_SCOPE)
  set(${out_str} "${_str}" PARENT_SCOPE)
endfunction()

if(FMNIST_CUDA STREQUAL "OFF")
  message(STATUS "fmnist_ext: CUDA kernels NOT built (FMNIST_CUDA=OFF); CPU kernels only")
  return()
endif()

_fmnist_cuda_blocker(_why _nvcc)
if(NOT _why STREQUAL "")
  if(FMNIST_CUDA STREQUAL "ON")
    message(FATAL_ERROR "fmnist_ext: FMNIST_CUDA=ON but the CUDA kernels cannot be built: ${_why}")
  endif()
  message(STATUS "fmnist_ext: CUDA kernels NOT built (${_why}); CPU kernels only "
                 "(FMNIST_CUDA=AUTO)")
  return()
endif()

# Architectures, before enable_language (which would otherwise pick its own).
if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(_arch_list "$ENV{TORCH_CUDA_ARCH_LIST}")
elseif(DEFINED TORCH_CUDA_ARCH_LIST AND NOT "${TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(_arch_list "${TORCH_CUDA_ARCH_LIST}")
else()
  set(_arch_list "8.0;9.0+PTX")
endif()
_fmnist_cuda_archs("${_arch_list}" _cmake_archs FMNIST_CUDA_ARCHS_STR)

# Versions: CMake able to pass C++20 to nvcc, nvcc of torch's CUDA major
# version, architectures this nvcc can build (cmake/cuda_checks.cmake).
include("${CMAKE_CURRENT_LIST_DIR}/cuda_checks.cmake")
if(CMAKE_CUDA_COMPILER)
  set(_nvcc "${CMAKE_CUDA_COMPILER}")
endif()
fmnist_nvcc_facts("${_nvcc}" _nvcc_version _nvcc_archs)
fmnist_cuda_decide("${FMNIST_CUDA}" "${CMAKE_VERSION}" "${CMAKE_CXX_STANDARD}" "${_nvcc_version}"
                   "${TORCH_CUDA_VERSION}" "${_nvcc_archs}" "${_cmake_archs}" _why _cmake_archs)
if(NOT _why STREQUAL "")
  message(STATUS "fmnist_ext: CUDA kernels NOT built (${_why}); CPU kernels only "
                 "(FMNIST_CUDA=AUTO)")
  set(FMNIST_CUDA_ARCHS_STR "")
  return()
endif()
fmnist_cuda_archs_str("${_cmake_archs}" FMNIST_CUDA_ARCHS_STR)
set(CMAKE_CUDA_ARCHITECTURES "${_cmake_archs}")

if(NOT CMAKE_CUDA_COMPILER)
  set(ENV{CUDACXX} "${_nvcc}")  # what check_language / enable_language use
endif()
# Host compiler for nvcc: the C++ compiler of the rest of the library.
if(NOT CMAKE_CUDA_HOST_COMPILER)
  set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}")
endif()
include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  set(_why "nvcc at ${_nvcc} failed CMake's CUDA compiler check (see CMakeFiles/CMakeConfigureLog.yaml)")
  if(FMNIST_CUDA STREQUAL "ON")
    message(FATAL_ERROR "fmnist_ext: FMNIST_CUDA=ON but ${_why}")
  endif()
  message(STATUS "fmnist_ext: CUDA kernels NOT built (${_why}); CPU kernels only")
  set(FMNIST_CUDA_ARCHS_STR "")
  return()
endif()
enable_language(CUDA)

# nvcc gets the C++ standard of the rest of the library (CMake >= 3.26 knows
# nvcc's -std=c++20; older ones were turned away above).
set(CMAKE_CUDA_STANDARD ${CMAKE_CXX_STANDARD})
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_EXTENSIONS OFF)
# The shared CUDA runtime, as torch uses (one runtime in the process).
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)

target_sources(fmnist_ext_C PRIVATE ${FMNIST_CUDA_SOURCES})
set_target_properties(fmnist_ext_C PROPERTIES
  CUDA_ARCHITECTURES "${_cmake_archs}"
  CUDA_RUNTIME_LIBRARY Shared
  CUDA_STANDARD ${CMAKE_CXX_STANDARD}
  CUDA_STANDARD_REQUIRED ON)
# No --use_fast_math: the pool scan relies on IEEE NaN comparisons.
set(_cuda_opts -O3 --expt-relaxed-constexpr -Xcompiler=-fvisibility=hidden
               -Xcompiler=-Wno-unused-function)
if(FMNIST_CUDA_PTXAS_VERBOSE)
  list(APPEND _cuda_opts -Xptxas=-v)
endif()
target_compile_options(fmnist_ext_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${_cuda_opts}>)
target_compile_definitions(fmnist_ext_C PRIVATE FMNIST_WITH_CUDA)

foreach(_lib c10_cuda torch_cuda)
  find_library(FMNIST_LIB_${_lib} NAMES ${_lib} PATHS ${TORCH_LIBRARY_DIRS} NO_DEFAULT_PATH)
  if(NOT FMNIST_LIB_${_lib})
    message(FATAL_ERROR "fmnist_ext: lib${_lib} not found in ${TORCH_LIBRARY_DIRS}")
  endif()
  target_link_libraries(fmnist_ext_C PRIVATE ${FMNIST_LIB_${_lib}})
endforeach()

set(FMNIST_WITH_CUDA ON)
get_filename_component(_nvcc_dir "${CMAKE_CUDA_COMPILER}" DIRECTORY)
message(STATUS "fmnist_ext: CUDA kernels built: nvcc ${CMAKE_CUDA_COMPILER_VERSION} "
               "(${CMAKE_CUDA_COMPILER}), torch CUDA ${TORCH_CUDA_VERSION}, "
               "architectures ${FMNIST_CUDA_ARCHS_STR}")
