# FindXxHash: the xxHash library (XXH3), from Debian's libxxhash-dev.
# Defines the imported target XxHash::XxHash and XxHash_FOUND,
# XxHash_INCLUDE_DIR, XxHash_LIBRARY, XxHash_VERSION.
find_path(XxHash_INCLUDE_DIR NAMES xxhash.h)
find_library(XxHash_LIBRARY NAMES xxhash)

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
  REQUIRED_VARS XxHash_LIBRARY XxHash_INCLUDE_DIR
  VERSION_VAR XxHash_VERSION
  REASON_FAILURE_MESSAGE "install Debian's libxxhash-dev (tools/setup.sh does)")

if(XxHash_FOUND AND NOT TARGET XxHash::XxHash)
  add_library(XxHash::XxHash UNKNOWN IMPORTED)
  set_target_properties(XxHash::XxHash PROPERTIES
    IMPORTED_LOCATION "${XxHash_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${XxHash_INCLUDE_DIR}")
endif()
mark_as_advanced(XxHash_INCLUDE_DIR XxHash_LIBRARY)
