#!/usr/bin/env bash
# A whole Flower deployment on this machine, on 127.0.0.1: SuperLink (TLS + SuperNode
# authentication) and N SuperNodes, for trying the deployment runtime before going multi-machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG start  --nodes N --dir DIR [--port P] [--connection NAME] [--flwr-home H]
                                [--node-config "k=v ..."] [--timeout S]
       $PROG stop   --dir DIR [--timeout S]
       $PROG status --dir DIR

start   Everything on 127.0.0.1, under DIR:
          DIR/certs        self-made CA + SuperLink certificate (127.0.0.1, localhost)
          DIR/keys         one P-384 key pair per SuperNode (node-0 .. node-(N-1))
          DIR/superlink    SuperLink log and PID (TLS, --enable-supernode-auth, state in memory)
          DIR/supernodes   SuperNode logs and PIDs
          DIR/flwr-home    FLWR_HOME with the connection NAME (default fedhf-local),
                           so your ~/.flwr is left alone
        registers each node's public key, then starts N SuperNodes with node config
        "partition-id=i num-partitions=N" (plus --node-config). Existing certificates
        and keys in DIR are reused. The ServerApp and ClientApps run as subprocesses of
        the SuperLink and SuperNodes and inherit this shell's environment: export
        FEDHF_DATA_DIR, HF_HUB_OFFLINE, HF_TOKEN, ... before 'start'.
stop    Stop the SuperNodes and the SuperLink started from DIR, by PID: SIGTERM, then
        SIGKILL after --timeout seconds (default 15), child processes included.
status  Show what runs; exit 0 when the SuperLink and every SuperNode run, 1 otherwise.

Options:
  --nodes N           number of SuperNodes (start)
  --dir DIR           working directory of this federation
  --port P            SuperLink Fleet port on 127.0.0.1 (default: a free port); the Control API
                      listens on P + 1 (default: another free port)
  --connection NAME   connection name written to \$FLWR_HOME/config.toml (default fedhf-local)
  --flwr-home H       FLWR_HOME to use (default DIR/flwr-home)
  --node-config STR   extra node config for every SuperNode, e.g. "max-epsilon=8"
  --timeout S         seconds to wait for each process to come up / go down
  -h, --help          show this help

Example:
  $PROG start --nodes 2 --dir /tmp/fed
  export FLWR_HOME=/tmp/fed/flwr-home
  flwr run . fedhf-local --stream --run-config "num-server-rounds=1"
  $PROG stop --dir /tmp/fed
EOF
}

[ $# -ge 1 ] || usage_error "missing command: start, stop or status"
CMD="$1"; shift
case "$CMD" in
  -h|--help) usage; exit 0 ;;
  start|stop|status) ;;
  *) usage_error "unknown command '$CMD' (start, stop or status)" ;;
esac

NODES="" DIR="" PORT="" CPORT="" CONN="fedhf-local" FHOME="" EXTRA_NC="" TIMEOUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes) need_value "$1" $#; NODES="$2"; shift 2 ;;
    --dir) need_value "$1" $#; DIR="$2"; shift 2 ;;
    --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
    --connection) need_value "$1" $#; CONN="$2"; shift 2 ;;
    --flwr-home) need_value "$1" $#; FHOME="$2"; shift 2 ;;
    --node-config) need_value "$1" $#; EXTRA_NC="$2"; shift 2 ;;
    --timeout) need_value "$1" $#; TIMEOUT="$2"; shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$DIR" ] || usage_error "--dir DIR is required"
[ -z "$TIMEOUT" ] || { is_uint "$TIMEOUT" && [ "$TIMEOUT" -ge 1 ]; } || usage_error "--timeout: '$TIMEOUT' is not a positive whole number"
if [ "$CMD" != start ]; then
  [ -z "$NODES$PORT$FHOME$EXTRA_NC" ] && [ "$CONN" = fedhf-local ] \
    || usage_error "'$CMD' takes only --dir (and --timeout)"
fi

DIR="$(abspath "$DIR")"
SL_STATE="$DIR/superlink"
SN_STATE="$DIR/supernodes"
ENV_FILE="$DIR/federation.env"

# ------------------------------------------------------------------------------------------- stop
do_stop() {
  local t="${TIMEOUT:-15}" f name rc=0
  [ -d "$DIR" ] || die "no federation directory $DIR"
  # SuperNodes first: a SuperNode whose SuperLink is gone just keeps retrying.
  if [ -d "$SN_STATE" ]; then
    for f in "$SN_STATE"/*.pid; do
      [ -e "$f" ] || continue
      name="$(basename "$f" .pid)"
      stop_pidfile "$f" "SuperNode $name" "$t" flower-supernode || rc=1
    done
  fi
  stop_pidfile "$SL_STATE/superlink.pid" SuperLink "$t" fedhf.flower.superlink || rc=1
  return "$rc"
}

# ----------------------------------------------------------------------------------------- status
do_status() {
  local f name pid all=0 n=0 up=0 addr=""
  [ -d "$DIR" ] || { echo "no federation in $DIR"; return 1; }
  [ -f "$ENV_FILE" ] && sed 's/^/  /' "$ENV_FILE"
  pid="$(read_pidfile "$SL_STATE/superlink.pid")"
  addr="$(cat "$SL_STATE/superlink.addr" 2>/dev/null || true)"
  if [ -n "$pid" ] && pid_alive "$pid" fedhf.flower.superlink; then
    echo "SuperLink      running  PID $pid  Fleet $addr  Control $(cat "$SL_STATE/superlink.control" 2>/dev/null || echo ?)"
  else
    echo "SuperLink      stopped${pid:+ (stale PID $pid)}"
    all=1
  fi
  if [ -d "$SN_STATE" ]; then
    # Every SuperNode ever started from DIR has a .port file; the .pid file goes on stop.
    for f in "$SN_STATE"/*.port; do
      [ -e "$f" ] || continue
      name="$(basename "$f" .port)"
      pid="$(read_pidfile "$SN_STATE/$name.pid")"
      n=$((n + 1))
      if [ -n "$pid" ] && pid_alive "$pid" flower-supernode; then
        printf 'SuperNode %-4s running  PID %s  ClientAppIO port %s\n' "$name" "$pid" "$(cat "$SN_STATE/$name.port" 2>/dev/null || echo ?)"
        up=$((up + 1))
      else
        printf 'SuperNode %-4s stopped%s\n' "$name" "${pid:+ (stale PID $pid)}"
        all=1
      fi
    done
  fi
  [ "$n" -gt 0 ] || { echo "no SuperNodes"; all=1; }
  return "$all"
}

# ------------------------------------------------------------------------------------------ start
do_start() {
  [ -n "$NODES" ] || usage_error "--nodes N is required"
  { is_uint "$NODES" && [ "$NODES" -ge 1 ]; } || usage_error "--nodes: '$NODES' is not a positive whole number"
  [ -z "$PORT" ] || check_port --port "$PORT"
  [[ "$CONN" =~ ^[A-Za-z0-9_-]+$ ]] || usage_error "--connection: '$CONN' may contain only letters, digits, '_' and '-'"
  deploy_env
  require_cmd flower-superlink flower-supernode flwr openssl ssh-keygen
  [ -z "$EXTRA_NC" ] || normalize_node_config "$EXTRA_NC" >/dev/null || exit 2
  local t="${TIMEOUT:-60}" i pid

  mkdir -p "$DIR"
  # Refuse to start twice from one directory.
  pid="$(read_pidfile "$SL_STATE/superlink.pid")"
  if [ -n "$pid" ] && pid_alive "$pid" fedhf.flower.superlink; then
    die "a federation from $DIR already runs (SuperLink PID $pid); '$PROG stop --dir $DIR' first"
  fi
  for f in "$SN_STATE"/*.pid; do
    [ -e "$f" ] || continue
    pid="$(read_pidfile "$f")"
    if [ -n "$pid" ] && pid_alive "$pid" flower-supernode; then
      die "a SuperNode from $DIR already runs (PID $pid, $f); '$PROG stop --dir $DIR' first"
    fi
    rm -f "$f"
  done
  rm -f "$SN_STATE"/*.port "$ENV_FILE"

  FHOME="$(abspath "${FHOME:-$DIR/flwr-home}")"
  export FLWR_HOME="$FHOME"
  if [ -n "$PORT" ]; then
    CPORT=$((PORT + 1))
  else
    { read -r PORT; read -r CPORT; } < <(free_ports 2 127.0.0.1)
  fi

  # Anything started below is stopped again if a later step fails.
  trap 'rc=$?; if [ $rc -ne 0 ]; then err "start failed; stopping what was started"; TIMEOUT=5 do_stop >/dev/null 2>&1 || true; fi' EXIT

  # 1. Certificates and keys (reused when present).
  if [ -f "$DIR/certs/ca.crt" ] && [ -f "$DIR/certs/server.crt" ] && [ -f "$DIR/certs/server.key" ]; then
    info "reusing certificates in $DIR/certs"
  else
    "$DEPLOY_DIR/make_certs.sh" --out "$DIR/certs" --hosts "127.0.0.1,localhost" --force >/dev/null
    info "certificates written to $DIR/certs (self-made CA, for local tests only)"
  fi
  local missing=()
  for ((i = 0; i < NODES; i++)); do
    [ -f "$DIR/keys/node-$i" ] && [ -f "$DIR/keys/node-$i.pub" ] || missing+=("node-$i")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    "$DEPLOY_DIR/make_node_keys.sh" --out "$DIR/keys" --names "${missing[*]}" --force >/dev/null
    info "node keys written to $DIR/keys: ${missing[*]}"
  fi

  # 2. SuperLink (fresh in-memory state: keys are registered again below).
  "$DEPLOY_DIR/start_superlink.sh" --certs "$DIR/certs" --host 127.0.0.1 --port "$PORT" --control-port "$CPORT" \
    --state "$SL_STATE" --timeout "$t" | sed 's/^/  /'

  # 3. Connection for the flwr CLI: the Control API's own (loopback) port.
  "$DEPLOY_DIR/connection.sh" --name "$CONN" --address "127.0.0.1:$CPORT" --ca "$DIR/certs/ca.crt" \
    >/dev/null
  info "connection '$CONN' -> 127.0.0.1:$CPORT written to $FLWR_HOME/config.toml"

  # 4. Register each SuperNode's public key.
  for ((i = 0; i < NODES; i++)); do
    local out
    if ! out="$("$DEPLOY_DIR/register_node.sh" --connection "$CONN" --key "$DIR/keys/node-$i.pub" --name "node-$i" 2>&1)"; then
      err "registering $DIR/keys/node-$i.pub failed:"
      printf '%s\n' "$out" >&2
      exit 1
    fi
    info "registered node-$i: $(printf '%s\n' "$out" | grep -o 'SuperNode [0-9]* registered' || echo ok)"
  done

  # 5. SuperNodes, one after the other (each gets its own free ClientAppIO port).
  mkdir -p "$SN_STATE"
  for ((i = 0; i < NODES; i++)); do
    "$DEPLOY_DIR/start_supernode.sh" --superlink "127.0.0.1:$PORT" --ca "$DIR/certs/ca.crt" \
      --key "$DIR/keys/node-$i" --node-config "partition-id=$i num-partitions=$NODES${EXTRA_NC:+ $EXTRA_NC}" \
      --name "node-$i" --state "$SN_STATE" --timeout "$t" | sed 's/^/  /'
  done

  cat >"$ENV_FILE" <<EOF
FLWR_HOME=$FLWR_HOME
CONNECTION=$CONN
SUPERLINK=127.0.0.1:$PORT
CONTROL=127.0.0.1:$CPORT
NODES=$NODES
EOF
  trap - EXIT
  cat <<EOF

Federation running: SuperLink Fleet API 127.0.0.1:$PORT (TLS + SuperNode authentication), Control API
127.0.0.1:$CPORT, $NODES SuperNodes.
  export FLWR_HOME=$FLWR_HOME
  flwr run . $CONN --stream                      # from the app's directory (the repository root)
  flwr ls $CONN                                  # runs and their status
  flwr log RUN_ID $CONN --show                   # a run's logs
  flwr stop RUN_ID $CONN                         # stop a run
  flwr supernode list $CONN                      # SuperNodes
  $0 status --dir $DIR
  $0 stop --dir $DIR
EOF
}

case "$CMD" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac
