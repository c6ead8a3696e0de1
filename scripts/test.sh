#!/usr/bin/env bash
# The whole test suite: installs dependencies, builds, runs every test.
#   0. the format check: every .cc and .h as clang-format-19 writes it (.clang-format)
#   1. Release build: unit, hostile, integration and end-to-end tests (QEMU guest, DPDK peers)
#   2. the README's first command: scripts/demo.sh in a fresh `git clone` of this checkout's
#      HEAD, run twice (a fresh tree, then a tree with the first run's build in it)
#   3. ASan+UBSan build: everything but the end-to-end tests
#   4. clang-19 libFuzzer build: a short smoke run of each fuzz target (UBSan and ASan fatal)
# Ends with one line "N passed, N failed, N skipped" over all stages; a stage that could not
# configure, build or run counts as one failure. Under CI (CI=true) any skipped test fails the
# run: scripts/deps.sh installs everything, so a skip there means something broke.
# Options: --quick (stages 0 and 1 only), --no-demo, --no-asan, --no-fuzz,
#          -R REGEX (passed to ctest)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

asan=1 fuzz=1 demo=1 ctest_args=()
while (($#)); do
  case "$1" in
    --quick) asan=0 fuzz=0 demo=0 ;;
    --no-asan) asan=0 ;;
    --no-fuzz) fuzz=0 ;;
    --no-demo) demo=0 ;;
    -R) ctest_args+=(-R "$2"); shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# A filtered run is for a developer's loop: the demo is not one of the filtered tests.
((${#ctest_args[@]})) && demo=0

scripts/deps.sh || { echo "test.sh: installing dependencies failed" >&2; exit 1; }

source scripts/lib/suite.sh
vk_suite_init
mkdir -p build

run_format_check
run_stage release build/release -- -DCMAKE_BUILD_TYPE=Release
((demo)) && run_demo_stage
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
    broken+=("fuzz-smoke: clang++-19 missing after scripts/deps.sh")
  fi
fi

vk_suite_summary
