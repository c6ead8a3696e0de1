#!/usr/bin/env bash
# vk_options (scripts/lib/common.sh), the command-line parser of the bench scripts: values in both
# spellings, flags, --help printing the header's range, and one line with exit 2 for an unknown
# option, a stray argument or a value that is missing. Then every bench script answers --help
# with exit 0 and a bad option with exit 2 (the ones that parse with vk_options: report.sh takes
# a file name).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/lib/common.sh"
vk_tmpdir

passes=0 fails=0
expect() {  # WHAT WANT GOT
  if [[ $2 == "$3" ]]; then
    echo "ok: $1"; passes=$((passes + 1))
  else
    echo "FAIL: $1: want '$2', got '$3'"; fails=$((fails + 1))
  fi
}

cat >"$VK_TMP/tool.sh" <<'SH'
#!/usr/bin/env bash
# line two of the header
# line three
# line four, not printed
source "$1/scripts/lib/common.sh"
shift
size=64 rounds=3 keep=0
vk_options tool.sh 3 size=size rounds=rounds keep-logs!keep -- "$@"
echo "size=$size rounds=$rounds keep=$keep"
SH
tool() { bash "$VK_TMP/tool.sh" "$root" "$@" 2>&1; echo "rc=$?"; }

expect "defaults" $'size=64 rounds=3 keep=0\nrc=0' "$(tool)"
expect "--opt V, --opt=V, a flag" $'size=1518 rounds=5 keep=1\nrc=0' \
  "$(tool --size 1518 --rounds=5 --keep-logs)"
expect "the last one given wins" $'size=256 rounds=3 keep=0\nrc=0' "$(tool --size=128 --size 256)"
expect "--help prints lines 2..3 of the header" $'line two of the header\nline three\nrc=0' "$(tool --help)"
expect "unknown option" $'tool.sh: unknown option \'--bogus\' (see --help)\nrc=2' "$(tool --bogus)"
expect "a flag given a value" $'tool.sh: unknown option \'--keep-logs=1\' (see --help)\nrc=2' \
  "$(tool --keep-logs=1)"
expect "missing value" $'tool.sh: --rounds needs a value (see --help)\nrc=2' "$(tool --rounds)"
expect "stray argument" $'tool.sh: unexpected argument \'x\' (see --help)\nrc=2' "$(tool x)"

scripts=$(grep -l '^vk_options ' "$root"/bench/*.sh)
expect "bench scripts parse with vk_options" 1 "$( (($(wc -w <<<"$scripts") >= 7)) && echo 1)"
for f in $scripts; do
  n=$(basename "$f")
  bash "$f" --help >/dev/null 2>&1
  expect "$n --help" 0 "$?"
  out=$(bash "$f" --no-such-option 2>&1)
  expect "$n bad option" "2 $n: unknown option '--no-such-option' (see --help)" "$? $out"
done

echo "options_test: $passes passed, $fails failed"
((fails == 0))
