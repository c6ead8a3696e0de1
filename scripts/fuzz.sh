#!/usr/bin/env bash
# Runs every libFuzzer target for SECONDS each (default 60), growing the committed corpus in
# fuzz/corpus/<target>/. A crash stops that target and leaves crash-* in fuzz/corpus/<target>/;
# turn it into a regression test, then delete it.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
seconds=${1:-60}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2; }
shift || true

command -v clang++-19 >/dev/null || scripts/deps.sh
build=build/fuzz
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-19 \
  -DVHOSTKIT_FUZZ=ON -DVHOSTKIT_TESTS=OFF -DVHOSTKIT_BENCH=OFF >/dev/null
cmake --build "$build"

targets=("$@")
if ((${#targets[@]} == 0)); then
  for f in fuzz/*_fuzz.cc; do targets+=("$(basename "$f" .cc)"); done
fi

# Any sanitizer report, undefined behaviour included, stops the target with an abort (libFuzzer
# saves the input as crash-*); the same settings as the ctest smoke runs (fuzz/CMakeLists.txt).
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1:detect_leaks=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1
# The symbolizer of clang-19's own version: names in stack traces.
[[ -x /usr/lib/llvm-19/bin/llvm-symbolizer ]] && export ASAN_SYMBOLIZER_PATH=/usr/lib/llvm-19/bin/llvm-symbolizer

status=0
for t in "${targets[@]}"; do
  bin=$build/fuzz/$t
  [[ -x $bin ]] || { echo "fuzz.sh: no such target '$t'" >&2; exit 2; }
  corpus=fuzz/corpus/$t
  mkdir -p "$corpus"
  before=$(find "$corpus" -type f | wc -l)
  echo "=== $t: ${seconds}s, corpus $before files"
  if ! "$bin" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$corpus/" "$corpus" 2>"$build/$t.log"; then
    echo "!!! $t crashed; see $build/$t.log and $corpus/crash-*"
    status=1
  fi
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$build/$t.log" || true
  echo "    corpus now $(find "$corpus" -type f | wc -l) files"
done
exit $status
