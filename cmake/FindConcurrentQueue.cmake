# FindConcurrentQueue: moodycamel's ConcurrentQueue (header-only).
#
# Debian's libconcurrentqueue-dev installs <concurrentqueue/concurrentqueue.h>
# and no CMake config; upstream installs a config named `concurrentqueue`.
# Defines the imported target ConcurrentQueue::ConcurrentQueue whose include
# directory makes <concurrentqueue/concurrentqueue.h> resolve, and sets
# ConcurrentQueue_FOUND / ConcurrentQueue_INCLUDE_DIR / ConcurrentQueue_VERSION.
find_path(ConcurrentQueue_INCLUDE_DIR
  NAMES concurrentqueue/concurrentqueue.h
  PATH_SUFFIXES include)

if(ConcurrentQueue_INCLUDE_DIR AND NOT ConcurrentQueue_VERSION)
  # The header carries no version macro; Debian's package does.
  find_program(_cq_dpkg_query dpkg-query)
  if(_cq_dpkg_query)
    execute_process(COMMAND ${_cq_dpkg_query} -W -f=\${Version} libconcurrentqueue-dev
                    OUTPUT_VARIABLE _cq_ver ERROR_QUIET RESULT_VARIABLE _cq_rc)
    if(_cq_rc EQUAL 0 AND _cq_ver MATCHES "^([0-9]+\\.[0-9]+\\.[0-9]+)")
      set(ConcurrentQueue_VERSION "${CMAKE_MATCH_1}")
    endif()
  endif()
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(ConcurrentQueue
  REQUIRED_VARS ConcurrentQueue_INCLUDE_DIR
  VERSION_VAR ConcurrentQueue_VERSION
  REASON_FAILURE_MESSAGE "install Debian's libconcurrentqueue-dev (tools/setup.sh does)")

if(ConcurrentQueue_FOUND AND NOT TARGET ConcurrentQueue::ConcurrentQueue)
  add_library(ConcurrentQueue::ConcurrentQueue INTERFACE IMPORTED)
  set_target_properties(ConcurrentQueue::ConcurrentQueue PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${ConcurrentQueue_INCLUDE_DIR}")
endif()
mark_as_advanced(ConcurrentQueue_INCLUDE_DIR)
