# Toolchain file: cross-build for 64-bit ARM Linux with Debian's
# g++-aarch64-linux-gnu, and run the result under qemu-user (the `aarch64`
# preset uses it; tests/HARDENING.md, "ARM").
#
# - Compiler and sysroot: aarch64-linux-gnu-g++ with its own C library and
#   headers under /usr/aarch64-linux-gnu; find_* looks only there for
#   libraries, headers and packages (never in the host's /usr/lib or
#   /usr/include, whose x86-64 objects cannot link).
# - Header-only dependencies (moodycamel's ConcurrentQueue, Boost, xxhash.h,
#   nlohmann-json for the metrics test)
#   are architecture-independent, but live in the host's /usr/include, which
#   must not be put on the cross compiler's path wholesale (its bits/ and
#   asm/ headers are x86-64's). So a staging directory in the build tree gets
#   one symlink per dependency, and only that directory is added as a system
#   include directory and a find root.
# - Tests run through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64 with the
#   target's loader and libraries from /usr/aarch64-linux-gnu), so `ctest`,
#   add_test(COMMAND <target>) and gtest_discover_tests work unchanged.
# - GoogleTest has no aarch64 build in Debian's host packages: the preset
#   sets JOBENGINE_GTEST_SOURCE_DIR=/usr/src/googletest (package
#   `googletest`) and tests/CMakeLists.txt builds it from source.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(JOBENGINE_CROSS_TRIPLE aarch64-linux-gnu)
set(JOBENGINE_CROSS_SYSROOT /usr/${JOBENGINE_CROSS_TRIPLE})
set(CMAKE_C_COMPILER ${JOBENGINE_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${JOBENGINE_CROSS_TRIPLE}-g++)

# Staged header-only dependencies: <build>/cross-headers/usr/include/<dep>
# -> /usr/include/<dep>. CMAKE_BINARY_DIR is also set (to a scratch dir)
# while CMake tests the compiler; staging there too is harmless.
set(_je_stage ${CMAKE_BINARY_DIR}/cross-headers)
foreach(_je_dep concurrentqueue boost xxhash.h nlohmann)
  if(NOT EXISTS /usr/include/${_je_dep})
    message(FATAL_ERROR "${_je_dep} is missing from /usr/include: run tools/setup.sh")
  endif()
  if(NOT EXISTS ${_je_stage}/usr/include/${_je_dep})
    file(MAKE_DIRECTORY ${_je_stage}/usr/include)
    file(CREATE_LINK /usr/include/${_je_dep} ${_je_stage}/usr/include/${_je_dep} SYMBOLIC)
  endif()
endforeach()
# Quoted for the shell that runs the compile: the build tree may have spaces.
set(CMAKE_CXX_FLAGS_INIT "-isystem \"${_je_stage}/usr/include\"")

set(CMAKE_FIND_ROOT_PATH ${JOBENGINE_CROSS_SYSROOT} ${_je_stage})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

find_program(JOBENGINE_QEMU_AARCH64 qemu-aarch64)
if(JOBENGINE_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${JOBENGINE_QEMU_AARCH64} -L ${JOBENGINE_CROSS_SYSROOT})
else()
  message(WARNING "qemu-aarch64 not found (Debian package qemu-user): the library builds, the "
                  "tests do not (GoogleTest lists a test binary's tests by running it); "
                  "run tools/setup.sh")
endif()
