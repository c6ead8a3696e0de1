# shellcheck shell=bash
# Shared helpers for vhostkit's test, demo and bench scripts. Source it; it defines functions only
# (plus traps once something registers a cleanup).
#
#   vk_log MSG...            "[script] MSG" on stderr
#   vk_check MSG             announce a check ("CHECK: MSG"), pair with vk_pass / vk_fail
#   vk_pass MSG              "PASS: MSG"
#   vk_fail MSG              "FAIL: MSG", runs cleanups, exits 1
#   vk_skip MSG              "SKIP: MSG", runs cleanups, exits 77 (ctest SKIP_RETURN_CODE)
#   vk_require_root          skip unless root
#   vk_require_cmd CMD...    skip unless every command exists
#   vk_on_exit CMD           register a cleanup (run LIFO on exit, failure, SIGINT, SIGTERM)
#   vk_track_pid PID [NAME]  kill PID (TERM, then KILL) on exit
#   vk_kill PID              stop a process now: TERM, wait up to 3 s, then KILL
#   vk_tmpdir                sets VK_TMP to a per-run directory removed on exit (VK_KEEP=1 keeps
#                            it); call it directly, not in $(...), so the cleanup is registered
#   vk_repo_root             the repository root
#   vk_wait_for SECONDS CMD...   poll CMD every 0.1 s until it succeeds; 1 on timeout
#   vk_now                   seconds since epoch, with fractions
#   vk_options NAME SPEC... -- ARGS...
#                            a script's command line: SPEC "opt=var" takes a value (--opt V or
#                            --opt=V sets $var), "opt!var" is a flag (sets var=1); -h/--help
#                            prints the script's header (its comment lines from line 2 up to the
#                            first line that is not a comment, "# " stripped) and exits 0; an
#                            unknown option or a missing value: one line naming NAME, exit 2
[[ -n ${VK_COMMON_SH:-} ]] && return 0
VK_COMMON_SH=1

VK_SCRIPT_NAME=${VK_SCRIPT_NAME:-$(basename "${0:-vhostkit}")}

vk_log() { echo "[$VK_SCRIPT_NAME] $*" >&2; }
vk_check() { echo "CHECK: $*"; }
vk_pass() { echo "PASS: $*"; }
vk_fail() { echo "FAIL: $*"; exit 1; }
vk_skip() { echo "SKIP: $*"; exit 77; }

vk_repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); }

vk_now() { date +%s.%N; }

# The header a script's --help prints: the comment block that follows line 1 (the #! line),
# ending at the first line that is not a comment, so it cannot drift from a count kept elsewhere.
vk__print_header() {
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$1"
}

vk_options() {
  local name=$1 spec arg opt val found
  shift
  local -A takes=() flag=()
  while (($#)) && [[ $1 != -- ]]; do
    spec=$1
    shift
    # A caller's mistake (such as a header line count, which this no longer takes) fails loudly
    # rather than becoming an option nobody can give.
    [[ $spec =~ ^[a-z0-9][a-z0-9-]*[=!][A-Za-z_][A-Za-z0-9_]*$ ]] ||
      { echo "vk_options: $name: bad spec '$spec' (want opt=var or opt!var)" >&2; exit 2; }
    if [[ $spec == *=* ]]; then takes[${spec%%=*}]=${spec#*=}; else flag[${spec%%!*}]=${spec#*!}; fi
  done
  shift  # --
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h|--help) vk__print_header "$0"; exit 0 ;;
      --*) ;;
      *) echo "$name: unexpected argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
    opt=${arg#--}
    found=0
    if [[ $opt == *=* ]]; then
      val=${opt#*=} opt=${opt%%=*}
      [[ -n ${takes[$opt]:-} ]] && { printf -v "${takes[$opt]}" '%s' "$val"; found=1; }
    elif [[ -n ${takes[$opt]:-} ]]; then
      (($#)) || { echo "$name: --$opt needs a value (see --help)" >&2; exit 2; }
      printf -v "${takes[$opt]}" '%s' "$1"
      shift
      found=1
    elif [[ -n ${flag[$opt]:-} ]]; then
      printf -v "${flag[$opt]}" '%s' 1
      found=1
    fi
    ((found)) || { echo "$name: unknown option '$arg' (see --help)" >&2; exit 2; }
  done
}

vk_require_root() {
  [[ $(id -u) -eq 0 ]] || vk_skip "needs root (network namespaces, TAP devices)"
}

vk_require_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || vk_skip "'$c' not installed (run scripts/deps.sh)"
  done
}

# --- cleanup registry -------------------------------------------------------------------------
VK_CLEANUPS=()
VK_TRAPS_SET=0
VK_CLEANING=0

vk__run_cleanups() {
  local rc=$?
  ((VK_CLEANING)) && return
  VK_CLEANING=1
  local i
  for ((i = ${#VK_CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${VK_CLEANUPS[i]}" >/dev/null 2>&1 || true
  done
  VK_CLEANUPS=()
  return $rc
}

vk__install_traps() {
  ((VK_TRAPS_SET)) && return
  VK_TRAPS_SET=1
  trap vk__run_cleanups EXIT
  # Exiting from the signal trap runs the EXIT trap, hence every cleanup.
  trap 'echo "interrupted" >&2; exit 130' INT
  trap 'echo "terminated" >&2; exit 143' TERM
  trap 'exit 129' HUP
}

vk_on_exit() {
  vk__install_traps
  VK_CLEANUPS+=("$1")
}

vk_kill() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

vk_track_pid() {
  vk_on_exit "vk_kill $1"
}

vk_tmpdir() {
  if [[ -z ${VK_TMP:-} ]]; then
    VK_TMP=$(mktemp -d "/tmp/vk-${VK_SCRIPT_NAME%.sh}.XXXXXX")
    if [[ ${VK_KEEP:-0} == 1 ]]; then
      vk_on_exit "echo 'kept $VK_TMP' >&2"
    else
      vk_on_exit "rm -rf '$VK_TMP'"
    fi
  fi
}

vk_wait_for() {
  local timeout=$1; shift
  local deadline=$((SECONDS + timeout))
  # SECONDS has 1 s granularity; count iterations too so a 1 s timeout still waits ~1 s.
  local n=0 max=$((timeout * 10))
  while ! "$@" 2>/dev/null; do
    ((n++ >= max || SECONDS > deadline)) && return 1
    sleep 0.1
  done
  return 0
}
