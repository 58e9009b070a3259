# Shared helpers for scripts/deploy/*.sh. Sourced, not run.
#
# - activates the repository's .venv (or $FEDHF_VENV) when it exists; installs nothing;
# - exports the environment Flower must run in (no runtime dependency installation, no telemetry);
# - error/warning printing, free-port finding, waiting for a port, PID files, stopping a process tree.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FEDHF_ROOT="$(cd "$DEPLOY_DIR/../.." && pwd)"
PROG="$(basename "${0:-deploy}")"

# --------------------------------------------------------------------------- messages
err()  { printf 'error: %s\n' "$*" >&2; }
die()  { err "$*"; exit 1; }
# Bad command line: print the error and a pointer to --help, exit 2.
usage_error() { err "$*"; printf "Run '%s --help' for usage.\n" "$PROG" >&2; exit 2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
info() { printf '[%s] %s\n' "$PROG" "$*" >&2; }

# need_value OPTION "$#" : the option at $1 must be followed by a value.
need_value() { [ "$2" -ge 2 ] || usage_error "option $1 needs a value"; }

# --------------------------------------------------------------------------- environment
deploy_env() {
  local venv="${FEDHF_VENV:-$FEDHF_ROOT/.venv}"
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$venv/bin/python" ]; then
    export VIRTUAL_ENV="$venv"
    export PATH="$venv/bin:$PATH"
  fi
  # The SuperLink otherwise installs the app's dependencies (from the network) for every run.
  export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
  export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
  export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
  # Local copies of the preset datasets, as scripts/_env.sh does (the ClientApps inherit it).
  if [ -z "${FEDHF_DATA_DIR:-}" ] && [ -d "$FEDHF_ROOT/../shared/data" ]; then
    FEDHF_DATA_DIR="$(cd "$FEDHF_ROOT/../shared/data" && pwd)"
    export FEDHF_DATA_DIR
  fi
}

# The python that has flwr (the venv's when active).
deploy_python() {
  if command -v python >/dev/null 2>&1 && python -c 'import flwr' >/dev/null 2>&1; then
    echo python
  elif command -v python3 >/dev/null 2>&1; then
    echo python3
  else
    die "no python found on PATH"
  fi
}

require_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found on PATH (activate the venv with Flower installed, e.g. source $FEDHF_ROOT/.venv/bin/activate)"
  done
}

# Absolute path of a file or directory that may not exist yet (its parent need not exist either).
abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *)  printf '%s/%s\n' "$(pwd)" "${1#./}" ;;
  esac
}

# --------------------------------------------------------------------------- validation
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
check_port() {  # check_port OPTION VALUE
  is_uint "$2" && [ "$2" -ge 1 ] && [ "$2" -le 65535 ] || usage_error "$1: '$2' is not a port number (1-65535)"
}
# split_hostport HOST:PORT -> sets HP_HOST, HP_PORT ([v6]:port accepted).
split_hostport() {
  local a="$1"
  if [[ "$a" =~ ^\[(.+)\]:([0-9]+)$ ]] || [[ "$a" =~ ^([^:]+):([0-9]+)$ ]]; then
    HP_HOST="${BASH_REMATCH[1]}"; HP_PORT="${BASH_REMATCH[2]}"
    [ "$HP_PORT" -ge 1 ] && [ "$HP_PORT" -le 65535 ] || return 1
    return 0
  fi
  return 1
}

# --------------------------------------------------------------------------- ports
# port_open HOST PORT: true when something accepts TCP connections there. Connects to HOST:
# use it only for addresses of this machine.
port_open() {
  (exec 3<>"/dev/tcp/$1/$2") >/dev/null 2>&1
}

# port_free HOST PORT: try to bind HOST:PORT (no traffic is sent anywhere). Returns 0 when the port
# is free, 1 when it is in use, 2 when HOST is not an address of this machine (message on stderr).
port_free() {
  "$(deploy_python)" - "$1" "$2" <<'PY'
import errno, socket, sys
host, port = sys.argv[1].strip("[]"), int(sys.argv[2])
try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
except socket.gaierror as e:
    print(f"error: cannot resolve {host!r}: {e}", file=sys.stderr)
    sys.exit(2)
fam, _, _, _, addr = infos[0]
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
try:
    s.bind(addr)
except OSError as e:
    if e.errno == errno.EADDRINUSE:
        sys.exit(1)
    if e.errno == errno.EADDRNOTAVAIL:
        print(f"error: {host} is not an address of this machine", file=sys.stderr)
        sys.exit(2)
    print(f"error: cannot bind {host}:{port}: {e}", file=sys.stderr)
    sys.exit(2)
finally:
    s.close()
PY
}

# free_port [HOST]: print a TCP port that is free on HOST (default 127.0.0.1) right now.
free_port() {
  local host="${1:-127.0.0.1}"
  "$(deploy_python)" - "$host" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1])
s.close()
PY
}

# free_ports N [HOST]: N distinct free ports, one per line (all bound at once, then released).
free_ports() {
  local n="$1" host="${2:-127.0.0.1}"
  "$(deploy_python)" - "$n" "$host" <<'PY'
import socket, sys
n, host = int(sys.argv[1]), sys.argv[2]
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

# wait_for_port HOST PORT TIMEOUT_S PID LOGFILE: until the port accepts connections.
# Fails (with the log tail) when PID exits first or the timeout passes.
wait_for_port() {
  local host="$1" port="$2" timeout="$3" pid="$4" log="$5" waited=0
  while ! port_open "$host" "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      err "process $pid exited before $host:$port accepted connections; last lines of $log:"
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    if [ "$waited" -ge $((timeout * 5)) ]; then
      err "timed out after ${timeout}s waiting for $host:$port (process $pid still running); last lines of $log:"
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
}

# --------------------------------------------------------------------------- processes
# pid_alive PID [PATTERN]: PID runs, and (when given) its command line contains PATTERN
# (guards against a PID reused by an unrelated process).
pid_alive() {
  local pid="$1" pat="${2:-}"
  is_uint "$pid" || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # A zombie is not running.
  local state
  state="$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ')" || return 1
  [[ "$state" == Z* ]] && return 1
  if [ -n "$pat" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pat" || return 1
  fi
  return 0
}

# read_pidfile FILE: print the PID in FILE (empty when absent or malformed).
read_pidfile() {
  local p=""
  [ -f "$1" ] && p="$(head -n1 "$1" | tr -dc '0-9')"
  printf '%s' "$p"
}

# descendants PID: all descendant PIDs of PID (children first level first).
descendants() {
  local kids k
  kids="$(ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true)"
  for k in $kids; do
    echo "$k"
    descendants "$k"
  done
}

# start_daemon PIDFILE LOGFILE CMD...: run CMD in its own session (so its whole process tree
# can be signalled as a group), stdin from /dev/null, stdout+stderr appended to LOGFILE;
# the PID is written to PIDFILE by the process itself before it execs CMD. Prints the PID.
start_daemon() {
  local pidfile="$1" log="$2"; shift 2
  rm -f "$pidfile"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 &
  local i
  for i in $(seq 1 50); do
    [ -s "$pidfile" ] && break
    sleep 0.1
  done
  [ -s "$pidfile" ] || die "could not start $1 (no PID file $pidfile); see $log"
  read_pidfile "$pidfile"
}

# stop_pid PID NAME [TIMEOUT_S] [PATTERN]: SIGTERM PID (graceful shutdown), wait up to TIMEOUT_S
# (default 15), then SIGKILL what is left of it, of its process group and of its descendants
# (collected before the first signal and again before the kill).
stop_pid() {
  local pid="$1" name="$2" timeout="${3:-15}" pat="${4:-}" i kids left
  if ! pid_alive "$pid" "$pat"; then
    info "$name: not running (PID ${pid:-?})"
    return 0
  fi
  kids="$(descendants "$pid" | sort -u)"
  info "$name: stopping PID $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 $((timeout * 5))); do
    pid_alive "$pid" || break
    kids="$(printf '%s\n%s\n' "$kids" "$(descendants "$pid")" | grep -v '^$' | sort -u || true)"
    sleep 0.2
  done
  # Children left behind (a ClientApp, SuperExec, ...): SIGTERM, short grace, then SIGKILL.
  left=""
  for k in $kids; do pid_alive "$k" && left="$left $k"; done
  if [ -n "$left" ]; then
    kill -TERM $left 2>/dev/null || true
    for i in $(seq 1 15); do
      local still=""
      for k in $left; do pid_alive "$k" && still="$still $k"; done
      left="$still"
      [ -z "$left" ] && break
      sleep 0.2
    done
  fi
  if pid_alive "$pid" || [ -n "$left" ]; then
    warn "$name: still running after ${timeout}s; sending SIGKILL to PID $pid${left:+ and children$left}"
    # The daemon is a session/group leader (start_daemon): kill the whole group as well.
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill -KILL "$pid" $left 2>/dev/null || true
    sleep 0.3
  fi
  if pid_alive "$pid"; then
    err "$name: PID $pid survived SIGKILL"
    return 1
  fi
  info "$name: stopped"
}

# stop_pidfile PIDFILE NAME [TIMEOUT_S] [PATTERN]: stop_pid on the PID in PIDFILE, then remove it.
stop_pidfile() {
  local pidfile="$1" name="$2" timeout="${3:-15}" pat="${4:-}" pid
  pid="$(read_pidfile "$pidfile")"
  if [ -z "$pid" ]; then
    info "$name: no PID file $pidfile"
    return 0
  fi
  stop_pid "$pid" "$name" "$timeout" "$pat" && rm -f "$pidfile"
}

# --------------------------------------------------------------------------- node config
# normalize_node_config "k1=v1 k2=/some/path": print the node config with every value that is
# not already a TOML value (int, float, bool, quoted string) double-quoted, so that
# 'data-path=/data/silo-a' works; Flower itself rejects an unquoted path. Fails on malformed input.
normalize_node_config() {
  "$(deploy_python)" - "$1" <<'PY'
import json, re, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
s = sys.argv[1]
# The pattern flwr.common.config.parse_config_args uses.
pattern = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
rest = pattern.sub("", s).strip()
if rest:
    sys.exit(f"error: --node-config: cannot read {rest!r}; write space-separated key=value pairs, e.g. 'partition-id=0 data-path=\"/data/silo\"'")
out = []
for key, value in pattern.findall(s):
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", key):
        sys.exit(f"error: --node-config: key {key!r} may contain only letters, digits, '_', '-' (and '.' between parts)")
    try:
        tomllib.loads(f"k = {value}")
    except tomllib.TOMLDecodeError:
        if value[:1] in "\"'":
            sys.exit(f"error: --node-config: value {value!r} of {key!r} is not a valid TOML string")
        value = json.dumps(value)  # a JSON string without control characters is a TOML basic string
    out.append(f"{key}={value}")
print(" ".join(out))
PY
}
