# shellcheck shell=bash
# The test suite's bookkeeping, sourced by scripts/test.sh (and by its own self-test,
# tests/scripts/suite_summary_test.sh):
#   vk_suite_init                   reset the counters
#   run_stage NAME DIR FILTER... -- CMAKE_ARGS...   configure, build and ctest one build tree
#   run_format_check                every tracked .cc/.h as clang-format-19 would write it (one result)
#   run_demo_stage                  scripts/demo.sh in a fresh clone of HEAD, twice
#   vk_suite_summary                print what broke and what was skipped, then the closing line
#                                   "N passed, N failed, N skipped"; returns the run's status
# A stage that could not configure, build or run counts as one failure; a skipped test (exit 77,
# GTEST_SKIP) is counted apart from the passed ones; under CI=true any skip fails the run.
# git on this checkout even when another user owns it (a CI runner's clone): the suite only reads
# it, so git's ownership guard has nothing to protect here.
vk_git() { git -c safe.directory='*' "$@"; }

vk_suite_init() {
  jobs=${VK_JOBS:-$(nproc)}
  total_pass=0 total_fail=0 total_skip=0
  broken=()    # "stage: what broke" for each stage that could not run its tests
  skipped=()   # "stage: test" for each skipped test
  t_start=$SECONDS
  [[ -v ctest_args ]] || ctest_args=()
}

# run_stage NAME BUILD_DIR CTEST_FILTER... -- CMAKE_ARGS...
run_stage() {
  local name=$1 dir=$2; shift 2
  local filter=()
  while [[ $1 != -- ]]; do filter+=("$1"); shift; done
  shift
  echo "=== stage: $name ($dir)"
  mkdir -p "$dir"
  if ! cmake -S . -B "$dir" -G Ninja "$@" >"$dir.configure.log" 2>&1; then
    cat "$dir.configure.log"; echo "test.sh: configure failed for $name" >&2
    broken+=("$name: cmake configure failed (log $dir.configure.log)"); return
  fi
  if ! cmake --build "$dir" -j "$jobs"; then
    echo "test.sh: build failed for $name" >&2
    broken+=("$name: build failed"); return
  fi
  local log="$dir/ctest.log"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs" --timeout 600 \
    "${filter[@]}" "${ctest_args[@]}" 2>&1 | tee "$log"
  local line
  line=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)
  if [[ -z $line ]]; then
    if grep -q 'No tests were found' "$log"; then
      broken+=("$name: ran no test")
    else
      broken+=("$name: ctest printed no summary (log $log)")
    fi
    return
  fi
  local failed ran skip
  failed=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
  ran=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")
  # ctest counts a skipped test (exit 77 with SKIP_RETURN_CODE, or GTEST_SKIP through
  # gtest_discover_tests' SKIP_REGULAR_EXPRESSION) among the passed ones: count it apart.
  local t
  skip=0
  while IFS= read -r t; do
    [[ -n $t ]] || continue
    skipped+=("$name: $t"); skip=$((skip + 1))
  done < <(sed -nE 's/^[[:space:]]*[0-9]+ - (.*) \(Skipped\)[[:space:]]*$/\1/p' "$log")
  total_pass=$((total_pass + ran - failed - skip))
  total_fail=$((total_fail + failed))
  total_skip=$((total_skip + skip))
}

# The house style (.clang-format) on every tracked C++ file: one result, "format".
run_format_check() {
  echo "=== stage: format (clang-format-19 --dry-run on every tracked .cc and .h)"
  if ! command -v clang-format-19 >/dev/null; then
    broken+=("format: clang-format-19 missing after scripts/deps.sh"); return
  fi
  local files bad
  mapfile -t files < <(vk_git ls-files '*.cc' '*.h')
  if ((${#files[@]} == 0)); then
    broken+=("format: git ls-files found no C++ file to check"); return
  fi
  bad=$(clang-format-19 --dry-run "${files[@]}" 2>&1 | sed -nE 's/^([^:]+):[0-9]+:[0-9]+: (warning|error):.*/\1/p' | sort -u)
  if [[ -z $bad ]]; then
    echo "format: Passed (${#files[@]} files)"
    total_pass=$((total_pass + 1))
  else
    echo "format: FAILED; not as clang-format-19 writes them (run clang-format-19 -i FILE...):"
    sed 's/^/  /' <<<"$bad"
    total_fail=$((total_fail + 1))
  fi
}

# The README's first command, as a newcomer runs it: in a fresh clone of HEAD (uncommitted
# changes are not in it), then once more in the same tree. Two results: demo.fresh-clone and
# demo.second-run.
run_demo_stage() {
  local repo=${repo:-$PWD}
  echo "=== stage: demo (scripts/demo.sh in a fresh git clone of HEAD)"
  if [[ $(id -u) -ne 0 ]]; then
    skipped+=("demo: scripts/demo.sh needs root"); total_skip=$((total_skip + 2)); return
  fi
  if [[ -n $(vk_git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    echo "test.sh: note: the demo runs the committed HEAD; uncommitted changes are not in it"
  fi
  local tmp clone log run
  tmp=$(mktemp -d /tmp/vk-demo-clone.XXXXXX)
  clone=$tmp/vhostkit
  if ! vk_git clone -q "$repo" "$clone"; then
    broken+=("demo: git clone of $repo failed"); rm -rf "$tmp"; return
  fi
  for run in fresh-clone second-run; do
    log=$repo/build/demo-$run.log
    echo "--- demo.$run (log $log)"
    if (cd "$clone" && timeout 1500 scripts/demo.sh) >"$log" 2>&1 &&
       grep -q '^\[demo\] SUCCESS' "$log"; then
      grep -E '^\[demo\] (SUCCESS|  guest:|  moved:|built in|guest up)' "$log"
      echo "demo.$run: Passed"
      total_pass=$((total_pass + 1))
    else
      tail -40 "$log"
      echo "demo.$run: FAILED"
      total_fail=$((total_fail + 1))
    fi
  done
  rm -rf "$tmp"
}

vk_suite_summary() {
  echo
  echo "=== summary ($(((SECONDS - t_start) / 60)) min $(((SECONDS - t_start) % 60)) s)"
  local status=0 b s
  for b in "${broken[@]}"; do echo "stage broken: $b"; done
  for s in "${skipped[@]}"; do echo "skipped: $s"; done
  # A stage that never ran its tests is a failure, so the closing line can't read "0 failed".
  total_fail=$((total_fail + ${#broken[@]}))
  ((total_fail == 0)) || status=1
  if [[ ${CI:-} == true ]] && ((total_skip > 0)); then
    echo "test.sh: $total_skip skipped under CI=true: every prerequisite is installed by scripts/deps.sh, so a skip is a failure here"
    status=1
  fi
  echo "$total_pass passed, $total_fail failed, $total_skip skipped"
  return $status
}
