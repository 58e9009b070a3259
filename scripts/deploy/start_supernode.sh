#!/usr/bin/env bash
# Start a Flower SuperNode (flower-supernode) that connects to a SuperLink over TLS with its key.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --superlink HOST:PORT --ca CA_CERT --key PRIVATE_KEY
             --node-config "partition-id=0 num-partitions=2 max-epsilon=8"
             [--name NAME] [--state DIR] [--clientappio-port P]
             [--max-retries N] [--max-wait-time S] [--timeout S] [--no-wait]
             [--foreground] [-- EXTRA flower-supernode ARGS]
       $PROG --superlink HOST:PORT --insecure --node-config "..." ...

Start flower-supernode in the background. It connects to the SuperLink's Fleet API
over TLS (the SuperLink's certificate must be signed by CA_CERT and name HOST),
authenticates with its private key (the matching NODE.pub must be registered with
'flwr supernode register', see register_node.sh) and runs each ClientApp as a
subprocess that inherits this environment (FEDHF_DATA_DIR, HF_HUB_OFFLINE, ...).
By default, wait until the SuperLink has accepted the SuperNode ('SuperNode ID: ...'
in its log); fail with the log tail when the SuperNode exits or --timeout passes.

Options:
  --superlink H:P       the SuperLink's address (its --host/--port)
  --ca FILE             CA certificate that signed the SuperLink's certificate
  --key FILE            this SuperNode's private key (from make_node_keys.sh)
  --node-config STR     space-separated key=value pairs handed to the ClientApp, e.g.
                        "partition-id=0 num-partitions=2" or 'data-path=/data/silo max-epsilon=8'
                        (values that are not numbers or booleans are quoted for you)
  --name NAME           name for the log and PID files (default supernode)
  --state DIR           state directory (default ./supernode-state): NAME.log, NAME.pid, and
                        NAME-fedhf/ (this node's DP accountant history: node config state-dir,
                        unless the node config sets one); restart with the same --state and
                        --name and the node's epsilon continues where it was
  --clientappio-port P  local port of this SuperNode's Runtime (ClientAppIO) API on
                        127.0.0.1, used by its SuperExec; every SuperNode on one machine
                        needs its own (default: a free port)
  --max-retries N       give up after N failed connection attempts (Flower's default: never)
  --max-wait-time S     give up connecting after S seconds (Flower's default: never)
  --timeout S           seconds to wait for the SuperLink to accept the SuperNode (default 60);
                        on timeout the SuperNode is stopped
  --no-wait             return right after starting (the SuperNode keeps retrying)
  --foreground          exec flower-supernode in the foreground
  --insecure            no TLS (only for a SuperLink started with --insecure)
  -h, --help            show this help
EOF
}

SUPERLINK="" CA="" KEY="" NODE_CONFIG="" NAME="supernode" STATE="supernode-state" CPORT=""
MAX_RETRIES="" MAX_WAIT="" TIMEOUT=60 WAIT=1 FG=0 INSECURE=0 NODE_CONFIG_SET=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --superlink) need_value "$1" $#; SUPERLINK="$2"; shift 2 ;;
    --ca|--root-certificates) need_value "$1" $#; CA="$2"; shift 2 ;;
    --key) need_value "$1" $#; KEY="$2"; shift 2 ;;
    --node-config) need_value "$1" $#; NODE_CONFIG="$2"; NODE_CONFIG_SET=1; shift 2 ;;
    --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
    --state) need_value "$1" $#; STATE="$2"; shift 2 ;;
    --clientappio-port) need_value "$1" $#; CPORT="$2"; shift 2 ;;
    --max-retries) need_value "$1" $#; MAX_RETRIES="$2"; shift 2 ;;
    --max-wait-time) need_value "$1" $#; MAX_WAIT="$2"; shift 2 ;;
    --timeout) need_value "$1" $#; TIMEOUT="$2"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --foreground) FG=1; shift ;;
    --insecure) INSECURE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$SUPERLINK" ] || usage_error "--superlink HOST:PORT is required"
split_hostport "$SUPERLINK" || usage_error "--superlink: '$SUPERLINK' is not HOST:PORT (no https:// prefix)"
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || usage_error "--name: '$NAME' may contain only letters, digits, '.', '_', '-'"
[ -z "$CPORT" ] || check_port --clientappio-port "$CPORT"
[ -z "$MAX_RETRIES" ] || is_uint "$MAX_RETRIES" || usage_error "--max-retries: '$MAX_RETRIES' is not a whole number"
[ -z "$MAX_WAIT" ] || [[ "$MAX_WAIT" =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "--max-wait-time: '$MAX_WAIT' is not a number of seconds"
{ is_uint "$TIMEOUT" && [ "$TIMEOUT" -ge 1 ]; } || usage_error "--timeout: '$TIMEOUT' is not a positive whole number"
[ "$NODE_CONFIG_SET" -eq 1 ] || usage_error "--node-config is required (e.g. --node-config \"partition-id=0 num-partitions=2\")"
if [ "$INSECURE" -eq 1 ]; then
  [ -z "$CA" ] || usage_error "--ca and --insecure exclude each other"
else
  [ -n "$CA" ] || usage_error "--ca CA_CERT is required (or --insecure for a SuperLink without TLS)"
  [ -r "$CA" ] || usage_error "--ca: '$CA' is missing or unreadable"
  CA="$(cd "$(dirname "$CA")" && pwd)/$(basename "$CA")"
fi
if [ -n "$KEY" ]; then
  [ -r "$KEY" ] || usage_error "--key: '$KEY' is missing or unreadable"
  case "$(head -c 20 "$KEY")" in
    "-----BEGIN"*) ;;
    ecdsa-sha2-*|ssh-*) usage_error "--key: '$KEY' is a public key; give the private key (the file without .pub)" ;;
    *) usage_error "--key: '$KEY' is not a PEM/OpenSSH private key" ;;
  esac
  KEY="$(cd "$(dirname "$KEY")" && pwd)/$(basename "$KEY")"
  perm="$(stat -c %a "$KEY")"
  [[ "$perm" =~ [0-7]00$ ]] || warn "$KEY is readable by others (mode $perm); chmod 600 it"
elif [ "$INSECURE" -eq 0 ]; then
  warn "no --key: the SuperLink accepts this SuperNode only if it runs without --enable-supernode-auth"
fi

deploy_env
require_cmd flower-supernode
NODE_CONFIG="$(normalize_node_config "$NODE_CONFIG")" || exit 2

mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDFILE="$STATE/$NAME.pid"
LOG="$STATE/$NAME.log"
old="$(read_pidfile "$PIDFILE")"
if [ -n "$old" ] && pid_alive "$old" flower-supernode; then
  die "SuperNode '$NAME' from $STATE already runs (PID $old); stop it first: kill $old"
fi
if [ -z "$CPORT" ]; then
  CPORT="$(free_port 127.0.0.1)"
elif ! port_free 127.0.0.1 "$CPORT"; then
  die "--clientappio-port $CPORT is already in use on 127.0.0.1; choose another (each SuperNode needs its own)"
fi

# This node's DP accountant history (its privacy spend) must survive a SuperNode restart: keep it
# under the state directory unless the node config names its own state-dir.
case " $NODE_CONFIG" in
  *" state-dir="*) ;;
  *) NODE_CONFIG="$NODE_CONFIG state-dir=\"$STATE/$NAME-fedhf\"" ;;
esac

args=(--superlink "$SUPERLINK" --host 127.0.0.1 --port "$CPORT" --node-config "$NODE_CONFIG")
if [ "$INSECURE" -eq 1 ]; then
  warn "--insecure: the connection to the SuperLink is not encrypted."
  args+=(--insecure)
else
  args+=(--root-certificates "$CA")
fi
[ -n "$KEY" ] && args+=(--auth-supernode-private-key "$KEY")
[ -n "$MAX_RETRIES" ] && args+=(--max-retries "$MAX_RETRIES")
[ -n "$MAX_WAIT" ] && args+=(--max-wait-time "$MAX_WAIT")
args+=("${EXTRA[@]+"${EXTRA[@]}"}")

echo "$CPORT" >"$STATE/$NAME.port"
if [ "$FG" -eq 1 ]; then
  echo $$ >"$PIDFILE"
  info "exec flower-supernode ${args[*]}"
  exec flower-supernode "${args[@]}"
fi

touch "$LOG"
offset="$(stat -c %s "$LOG")"
echo "[$(date -u +%FT%TZ)] flower-supernode ${args[*]}" >>"$LOG"
pid="$(start_daemon "$PIDFILE" "$LOG" flower-supernode "${args[@]}")"

if [ "$WAIT" -eq 1 ]; then
  # Flower logs 'SuperNode ID: <id>' once the SuperLink has accepted (activated) the node.
  waited=0 node_id=""
  while :; do
    node_id="$(tail -c +"$((offset + 1))" "$LOG" | sed -n 's/.*SuperNode ID: \([0-9]*\).*/\1/p' | head -n1)"
    [ -n "$node_id" ] && break
    if ! pid_alive "$pid"; then
      err "SuperNode '$NAME' exited without connecting to $SUPERLINK; last lines of $LOG:"
      tail -c +"$((offset + 1))" "$LOG" | tail -n 25 >&2
      rm -f "$PIDFILE"
      exit 1
    fi
    if [ "$waited" -ge $((TIMEOUT * 5)) ]; then
      err "SuperNode '$NAME' not accepted by $SUPERLINK within ${TIMEOUT}s; stopping it. Last lines of $LOG:"
      tail -c +"$((offset + 1))" "$LOG" | tail -n 25 >&2
      stop_pid "$pid" "SuperNode $NAME" 10 >/dev/null 2>&1 || true
      rm -f "$PIDFILE"
      exit 1
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  echo "SuperNode '$NAME' running: PID $pid, node ID $node_id, connected to $SUPERLINK, ClientAppIO port $CPORT"
else
  echo "SuperNode '$NAME' started: PID $pid, connecting to $SUPERLINK, ClientAppIO port $CPORT (not waited for)"
fi
echo "  node config: $NODE_CONFIG"
echo "  log: $LOG"
echo "  pid: $PIDFILE"
