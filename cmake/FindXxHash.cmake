# FindXxHash: the xxHash headers (XXH3), from Debian's libxxhash-dev.
# Defines the imported target XxHash::XxHash and XxHash_FOUND,
# XxHash_INCLUDE_DIR, XxHash_VERSION.
#
# Header-only: the one user (persistence/snapshot_format.cc) defines
# XXH_INLINE_ALL, so nothing links libxxhash. That also lets a cross build
# (cmake/aarch64-linux-gnu.cmake) use the host's architecture-independent
# xxhash.h without a libxxhash for the target.
find_path(XxHash_INCLUDE_DIR NAMES xxhash.h)

if(XxHash_INCLUDE_DIR AND EXISTS "${XxHash_INCLUDE_DIR}/xxhash.h")
  file(STRINGS "${XxHash_INCLUDE_DIR}/xxhash.h" _xxh_lines
       REGEX "^#define XXH_VERSION_(MAJOR|MINOR|RELEASE) +[0-9]+")
  foreach(_part MAJOR MINOR RELEASE)
    string(REGEX REPLACE ".*XXH_VERSION_${_part} +([0-9]+).*" "\\1" _xxh_${_part} "${_xxh_lines}")
  endforeach()
  set(XxHash_VERSION "${_xxh_MAJOR}.${_xxh_MINOR}.${_xxh_RELEASE}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(XxHash
  REQUIRED_VARS XxHash_INCLUDE_DIR
  VERSION_VAR XxHash_VERSION
  REASON_FAILURE_MESSAGE "install Debian's libxxhash-dev (tools/setup.sh does)")

if(XxHash_FOUND AND NOT TARGET XxHash::XxHash)
  add_library(XxHash::XxHash INTERFACE IMPORTED)
  set_target_properties(XxHash::XxHash PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${XxHash_INCLUDE_DIR}")
endif()
mark_as_advanced(XxHash_INCLUDE_DIR)
