#!/usr/bin/env bash
# The suite's own bookkeeping (scripts/lib/suite.sh) on tiny CMake projects: a skipped test is
# counted apart from the passed ones (ctest exit-77 skips and GTEST_SKIP-style skips), a stage
# whose build fails counts as a failure (the closing line never reads "0 failed" then), and under
# CI=true a skip alone fails the run.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib/common.sh"
source "$here/../../scripts/lib/suite.sh"
vk_require_cmd cmake ctest ninja
vk_tmpdir

# project DIR CMAKE_BODY: a LANGUAGES NONE project, so configuring it takes a fraction of a second.
project() {
  mkdir -p "$1"
  printf 'cmake_minimum_required(VERSION 3.25)\nproject(p NONE)\nenable_testing()\n%s\n' "$2" \
    >"$1/CMakeLists.txt"
}
project "$VK_TMP/mixed" '
add_test(NAME pass1 COMMAND true)
add_test(NAME pass2 COMMAND true)
add_test(NAME skip77 COMMAND sh -c "exit 77")
set_tests_properties(skip77 PROPERTIES SKIP_RETURN_CODE 77)
add_test(NAME gtest_skip COMMAND sh -c "echo \"[  SKIPPED ] Case.Name\"")
set_tests_properties(gtest_skip PROPERTIES SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
add_test(NAME fail1 COMMAND false)'
project "$VK_TMP/skiponly" '
add_test(NAME pass1 COMMAND true)
add_test(NAME skip77 COMMAND sh -c "exit 77")
set_tests_properties(skip77 PROPERTIES SKIP_RETURN_CODE 77)'
project "$VK_TMP/nobuild" '
add_custom_target(broken ALL COMMAND false)
add_test(NAME pass1 COMMAND true)'

# run SUBDIR...: run_stage on each, then the summary; prints the closing line and the status.
run() {
  local d out rc
  out=$(
    vk_suite_init
    for d in "$@"; do
      # run_stage works on the caller's counters: run it in this shell, from the project dir.
      pushd "$VK_TMP/$d" >/dev/null; run_stage "$d" build -- >/dev/null 2>&1; popd >/dev/null
    done
    vk_suite_summary; echo "status=$?")
  tail -2 <<<"$out" | tr '\n' ' '
}

vk_check "passed, failed and skipped are counted apart (exit 77 and a GTEST_SKIP-style skip)"
got=$(CI= run mixed)
[[ $got == "2 passed, 1 failed, 2 skipped status=1 " ]] || vk_fail "got '$got'"
vk_pass "$got"

vk_check "a stage whose build fails counts as a failure"
got=$(CI= run nobuild)
[[ $got == "0 passed, 1 failed, 0 skipped status=1 " ]] || vk_fail "got '$got'"
vk_pass "$got"

vk_check "skips alone pass outside CI and fail under CI=true"
got=$(CI= run skiponly)
[[ $got == "1 passed, 0 failed, 1 skipped status=0 " ]] || vk_fail "outside CI: got '$got'"
got=$(CI=true run skiponly)
[[ $got == "1 passed, 0 failed, 1 skipped status=1 " ]] || vk_fail "under CI=true: got '$got'"
vk_pass "$got"
echo "suite_summary_test: all checks passed"
