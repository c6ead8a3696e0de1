#!/usr/bin/env bash
# vk_options (scripts/lib/common.sh), the command-line parser of the bench scripts: values in both
# spellings, flags, --help printing the header comment, and one line with exit 2 for an unknown
# option, a stray argument or a value that is missing. Then every script that parses with
# vk_options (bench/, scripts/, tests/; report.sh takes a file name and does not) answers --help
# with exit 0, its usage line, no line of code and its header's last line last; and a bad option
# with exit 2. blk.sh's disk mode arguments (--disk, --rounds) are checked before anything
# starts (exit 2, one line).
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
#
#   line four, indented
source "$1/scripts/lib/common.sh"
# a comment past the first line of code, not printed
shift
size=64 rounds=3 keep=0
vk_options tool.sh size=size rounds=rounds keep-logs!keep -- "$@"
echo "size=$size rounds=$rounds keep=$keep"
SH
tool() { bash "$VK_TMP/tool.sh" "$root" "$@" 2>&1; echo "rc=$?"; }

expect "defaults" $'size=64 rounds=3 keep=0\nrc=0' "$(tool)"
expect "--opt V, --opt=V, a flag" $'size=1518 rounds=5 keep=1\nrc=0' \
  "$(tool --size 1518 --rounds=5 --keep-logs)"
expect "the last one given wins" $'size=256 rounds=3 keep=0\nrc=0' "$(tool --size=128 --size 256)"
expect "--help prints the header, lines 2 up to the first line of code" \
  $'line two of the header\n\n  line four, indented\nrc=0' "$(tool --help)"
expect "unknown option" $'tool.sh: unknown option \'--bogus\' (see --help)\nrc=2' "$(tool --bogus)"
expect "a flag given a value" $'tool.sh: unknown option \'--keep-logs=1\' (see --help)\nrc=2' \
  "$(tool --keep-logs=1)"
expect "missing value" $'tool.sh: --rounds needs a value (see --help)\nrc=2' "$(tool --rounds)"
expect "stray argument" $'tool.sh: unexpected argument \'x\' (see --help)\nrc=2' "$(tool x)"
cat >"$VK_TMP/old.sh" <<'SH'
#!/usr/bin/env bash
source "$1/scripts/lib/common.sh"
shift
vk_options old.sh 19 size=size -- "$@"
SH
expect "a spec that is not opt=var or opt!var (a stale header line count)" \
  $'vk_options: old.sh: bad spec \'19\' (want opt=var or opt!var)\nrc=2' \
  "$(bash "$VK_TMP/old.sh" "$root" --help 2>&1; echo "rc=$?")"

# The header --help should print, found here line by line: the comments from line 2 on, "# " off.
header() {
  local line n=0
  while IFS= read -r line; do
    ((n++ == 0)) && continue
    [[ $line == '#'* ]] || break
    line=${line#\#}
    printf '%s\n' "${line# }"
  done <"$1"
}

# Every script in the tree that calls vk_options (this file's fixtures aside).
scripts=$(cd "$root" && grep -rlE --include='*.sh' '^[[:space:]]*vk_options [^(]' bench scripts tests |
  grep -vxF tests/scripts/options_test.sh | sort)
expect "scripts parse with vk_options" 1 "$( (($(wc -w <<<"$scripts") >= 7)) && echo 1)"
for rel in $scripts; do
  f=$root/$rel n=$(basename "$rel")
  out=$(bash "$f" --help 2>&1)
  expect "$rel --help" 0 "$?"
  expect "$rel --help prints its usage line" 1 \
    "$(grep -qE "^[[:space:]]*${rel//./\\.}( |$)" <<<"$out" && echo 1)"
  expect "$rel --help prints no code" "" \
    "$(grep -E '^(set -|source |\. |here=|root=|VK_SCRIPT_NAME=)|vk_options' <<<"$out" | head -1)"
  want=$(header "$f" | tail -1)
  expect "$rel --help ends with the header's last line" "${want:-(no header)}" "$(tail -1 <<<"$out")"
  out=$(bash "$f" --no-such-option 2>&1)
  expect "$rel bad option" "2 $n: unknown option '--no-such-option' (see --help)" "$? $out"
done

# blk.sh: disk mode's arguments are checked before anything is started.
blk=$root/bench/blk.sh
expect "blk.sh --help names --disk and --rounds" 2 "$(bash "$blk" --help | grep -cE '^ *--(disk\[=DIR\]|rounds) ')"
blk() { bash "$blk" "$@" 2>&1; echo "rc=$?"; }
expect "blk.sh --rounds without --disk" \
  $'blk.sh: --rounds is for disk mode (--disk); tmpfs mode runs every point once\nrc=2' "$(blk --rounds=3)"
expect "blk.sh --disk=DIR that does not exist" \
  $'blk.sh: --disk: /nonexistent-vk-dir is not a directory\nrc=2' "$(blk --disk=/nonexistent-vk-dir)"
expect "blk.sh --disk= with no directory" \
  $'blk.sh: --disk= needs a directory (or --disk alone for /var/tmp)\nrc=2' "$(blk --disk=)"
expect "blk.sh --disk DIR (the value only with =)" \
  $'blk.sh: unexpected argument \'/var/tmp\' (see --help)\nrc=2' "$(blk --disk /var/tmp)"
expect "blk.sh --disk --rounds 0" $'blk.sh: --rounds must be a whole number >= 1\nrc=2' "$(blk --disk --rounds 0)"
if [[ $(stat -f -c %T /dev/shm 2>/dev/null) == tmpfs ]]; then
  expect "blk.sh --disk=DIR on tmpfs" \
    $'blk.sh: --disk: /dev/shm is on tmpfs, not a disk (tmpfs mode is blk.sh without --disk)\nrc=2' \
    "$(blk --disk=/dev/shm)"
fi

echo "options_test: $passes passed, $fails failed"
((fails == 0))
