#!/usr/bin/env bash
# Install test: installs a jobengine build tree into a temporary prefix, then
# configures, builds and runs tests/install/consumer against that prefix only.
#
# usage: run_install_test.sh CMAKE BUILD_DIR CONSUMER_SRC [GENERATOR] [CONFIG]
#                            [CXX_COMPILER] [CXX_FLAGS] [EXE_LINKER_FLAGS]
# The compiler and flags are the build tree's own, so that a sanitizer build's
# library links into the consumer. Exit 77 (reported by ctest as skipped) when
# cmake is not available; any other failure fails the test.
set -euo pipefail

cmake_bin=${1:?cmake}
build_dir=${2:?build dir}
consumer_src=${3:?consumer source dir}
generator=${4:-}
config=${5:-}
cxx=${6:-}
cxx_flags=${7:-}
linker_flags=${8:-}

if ! command -v "$cmake_bin" >/dev/null 2>&1; then
  echo "SKIP: cmake not found ($cmake_bin)"
  exit 77
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/jobengine-install-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

echo "== installing $build_dir into $prefix"
install_args=(--install "$build_dir" --prefix "$prefix")
[[ -n $config ]] && install_args+=(--config "$config")
"$cmake_bin" "${install_args[@]}"

test -f "$prefix/include/jobengine/engine.h" || { echo "FAIL: headers not installed"; exit 1; }
config_file=$(find "$prefix" -name jobengineConfig.cmake -print -quit)
test -n "$config_file" || { echo "FAIL: jobengineConfig.cmake not installed"; exit 1; }

echo "== configuring the consumer against $prefix"
configure_args=(-S "$consumer_src" -B "$work/build" "-DCMAKE_PREFIX_PATH=$prefix"
                -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
[[ -n $generator ]] && configure_args+=(-G "$generator")
[[ -n $config ]] && configure_args+=("-DCMAKE_BUILD_TYPE=$config")
[[ -n $cxx ]] && configure_args+=("-DCMAKE_CXX_COMPILER=$cxx")
configure_args+=("-DCMAKE_CXX_FLAGS=$cxx_flags" "-DCMAKE_EXE_LINKER_FLAGS=$linker_flags")
"$cmake_bin" "${configure_args[@]}"

echo "== building the consumer"
build_args=(--build "$work/build")
[[ -n $config ]] && build_args+=(--config "$config")
"$cmake_bin" "${build_args[@]}"

echo "== running the consumer"
consumer=$(find "$work/build" -type f -name consumer -perm -u+x -print -quit)
test -n "$consumer" || { echo "FAIL: consumer executable not found"; exit 1; }
"$consumer"
echo "PASS"
