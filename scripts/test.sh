#!/usr/bin/env bash
# The whole test suite: installs dependencies, builds, runs every test.
#   1. Release build: unit, hostile, integration and end-to-end tests (QEMU guest, DPDK peers)
#   2. ASan+UBSan build: everything but the end-to-end tests
#   3. clang-19 libFuzzer build: a short smoke run of each fuzz target
# Ends with one line "N passed, N failed" over all stages.
# Options: --quick (stage 1 only), --no-asan, --no-fuzz, -R REGEX (passed to ctest)
set -uo pipefail
cd "$(dirname "$0")/.."

asan=1 fuzz=1 ctest_args=()
while (($#)); do
  case "$1" in
    --quick) asan=0 fuzz=0 ;;
    --no-asan) asan=0 ;;
    --no-fuzz) fuzz=0 ;;
    -R) ctest_args+=(-R "$2"); shift ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

scripts/deps.sh || { echo "test.sh: installing dependencies failed" >&2; exit 1; }

jobs=$(nproc)
total_pass=0 total_fail=0 stage_failed=0

# run_stage NAME BUILD_DIR CTEST_FILTER... -- CMAKE_ARGS...
run_stage() {
  local name=$1 dir=$2; shift 2
  local filter=()
  while [[ $1 != -- ]]; do filter+=("$1"); shift; done
  shift
  echo "=== stage: $name ($dir)"
  if ! cmake -S . -B "$dir" -G Ninja "$@" >"$dir.configure.log" 2>&1; then
    mkdir -p "$dir"; cat "$dir.configure.log"; echo "test.sh: configure failed for $name" >&2
    stage_failed=1; return
  fi
  if ! cmake --build "$dir" -j "$jobs"; then
    echo "test.sh: build failed for $name" >&2; stage_failed=1; return
  fi
  local log="$dir/ctest.log"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs" --timeout 600 \
    "${filter[@]}" "${ctest_args[@]}" 2>&1 | tee "$log"
  local line
  line=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)
  if [[ -z $line ]]; then
    if grep -q 'No tests were found' "$log"; then echo "test.sh: $name ran no test"; fi
    stage_failed=1; return
  fi
  local failed ran
  failed=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
  ran=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")
  total_pass=$((total_pass + ran - failed))
  total_fail=$((total_fail + failed))
}

mkdir -p build
run_stage release build/release -- -DCMAKE_BUILD_TYPE=Release
if ((asan)); then
  # -O1 -g1: what ASan recommends, line tables for its reports, and half the compile time of
  # -O2 -g (the biggest share of this script's run time on 2 cores).
  run_stage asan+ubsan build/asan -LE e2e -- -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" \
    -DVHOSTKIT_SANITIZE=address,undefined -DVHOSTKIT_BENCH=OFF
fi
if ((fuzz)); then
  if command -v clang++-19 >/dev/null; then
    run_stage fuzz-smoke build/fuzz -L fuzz -- -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_COMPILER=clang++-19 -DVHOSTKIT_FUZZ=ON -DVHOSTKIT_BENCH=OFF -DVHOSTKIT_TESTS=OFF
  else
    echo "=== stage: fuzz-smoke skipped (clang++-19 not installed)"
  fi
fi

echo
echo "$total_pass passed, $total_fail failed"
((total_fail == 0 && stage_failed == 0))
