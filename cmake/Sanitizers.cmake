# CONVCORE_SANITIZE: a comma-separated list of sanitizers (address, undefined,
# leak, thread) compiled into everything this tree builds: the core, the
# runtime, the C++ tests, fuzz drivers and examples (and the Python module,
# which then needs LD_PRELOAD of the sanitizer runtime to be imported).
#
#   cmake -S . -B build/asan -DCONVCORE_BUILD_TESTS=ON -DCONVCORE_SANITIZE=address,undefined
#
# UBSan findings abort (-fno-sanitize-recover) so that ctest fails on them
# instead of printing a warning nobody reads.
set(CONVCORE_SANITIZE "" CACHE STRING
    "Sanitizers to build with, e.g. address,undefined (empty: none)")

# The core's optimisation level. A sanitized core builds at -O1: at -O3 GCC
# spent over half an hour on the instrumented, unrolled kernels of
# blocked_ops.cpp alone (docs/reliability.md), and a sanitizer build checks
# memory and behaviour, not speed.
set(CONVCORE_CORE_OPTIMIZE -O3)

if(CONVCORE_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "CONVCORE_SANITIZE needs GCC or Clang")
  endif()
  string(REPLACE "," ";" _convcore_sanitizers "${CONVCORE_SANITIZE}")
  foreach(_s IN LISTS _convcore_sanitizers)
    if(NOT _s MATCHES "^(address|undefined|leak|thread)$")
      message(FATAL_ERROR "CONVCORE_SANITIZE: unknown sanitizer '${_s}'")
    endif()
  endforeach()
  set(_convcore_flags -fsanitize=${CONVCORE_SANITIZE} -fno-omit-frame-pointer -g)
  if("undefined" IN_LIST _convcore_sanitizers)
    list(APPEND _convcore_flags -fno-sanitize-recover=all)
  endif()
  add_compile_options(${_convcore_flags})
  set(CONVCORE_CORE_OPTIMIZE -O1)
  add_link_options(-fsanitize=${CONVCORE_SANITIZE})
  message(STATUS "convcore: building with -fsanitize=${CONVCORE_SANITIZE}")
endif()
