# vhostkit_module(NAME SOURCES ... DEPS ...): a module library vhostkit_NAME.
function(vhostkit_module name)
  cmake_parse_arguments(M "" "" "SOURCES;DEPS" ${ARGN})
  if(M_SOURCES)
    add_library(vhostkit_${name} STATIC ${M_SOURCES})
    target_include_directories(vhostkit_${name} PUBLIC ${PROJECT_SOURCE_DIR}/include)
    target_link_libraries(vhostkit_${name} PUBLIC ${M_DEPS})
  else()
    add_library(vhostkit_${name} INTERFACE)
    target_include_directories(vhostkit_${name} INTERFACE ${PROJECT_SOURCE_DIR}/include)
    target_link_libraries(vhostkit_${name} INTERFACE ${M_DEPS})
  endif()
  add_library(vhostkit::${name} ALIAS vhostkit_${name})
endfunction()

# Test code is compiled at this optimisation level whatever the build type: the code under test
# is the module libraries, built with the build type's flags, and gtest-heavy test files compile
# in about 60% of the time at -O1 than at -O3. Empty: the build type's own level.
set(VHOSTKIT_TEST_OPT "-O1" CACHE STRING "Optimisation flag for test code (empty: the build type's)")

# vhostkit_test(NAME SOURCES ... DEPS ... [LABELS ...] [TIMEOUT s]): a gtest binary,
# each test case registered with CTest.
function(vhostkit_test name)
  if(NOT VHOSTKIT_TESTS)
    return()
  endif()
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  if(NOT T_LABELS)
    set(T_LABELS unit)
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
  endif()
  add_executable(${name} ${T_SOURCES})
  target_compile_options(${name} PRIVATE ${VHOSTKIT_TEST_OPT})
  target_link_libraries(${name} PRIVATE ${T_DEPS} GTest::gtest GTest::gtest_main GTest::gmock Threads::Threads)
  gtest_discover_tests(${name}
    PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT}
    DISCOVERY_TIMEOUT 60)
endfunction()
