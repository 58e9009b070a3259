#!/usr/bin/env bash
# Start a Flower SuperLink with TLS and SuperNode authentication; its Control API on loopback only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --certs DIR [--host H] [--port P] [--control-port C] [--state DIR]
             [--database] [--timeout S] [--foreground] [--expose-control-api]
             [-- EXTRA flower-superlink ARGS]
       $PROG --insecure [--host H] [--port P] [--state DIR] ...

Start Flower's SuperLink (python -m fedhf.flower.superlink) in the background with TLS
(DIR/ca.crt, DIR/server.crt, DIR/server.key as written by make_certs.sh), SuperNode
authentication (--enable-supernode-auth: only SuperNodes whose public key was
registered with 'flwr supernode register' may connect) and no runtime dependency
installation. Wait until both ports accept connections, then print the addresses.

Two listeners: SuperNodes connect to H:P, where only the Fleet API answers. The
Control API (flwr run, flwr ls, flwr supernode register) has no user authentication
in Flower OSS: whoever reaches it can submit runs that execute on every SuperNode.
So it listens on 127.0.0.1:C only; from another machine, reach it through an SSH
tunnel: ssh -L C:127.0.0.1:C USER@SUPERLINK-HOST, then connect the flwr CLI to
127.0.0.1:C (connection.sh --address 127.0.0.1:C).

Options:
  --certs DIR     directory with ca.crt, server.crt, server.key (required unless --insecure)
  --host H        address SuperNodes connect to (default 127.0.0.1; 0.0.0.0 for all interfaces)
  --port P        port of the Fleet API (default 8000)
  --control-port C  port of the Control and Runtime APIs on 127.0.0.1 (default P + 1)
  --expose-control-api  also serve the Control API on H:P (prints a warning): anyone
                  who reaches H:P can then register keys and submit runs
  --state DIR     state directory (default ./superlink-state): superlink.log,
                  superlink.pid, superlink.addr and, with --database, superlink.db
  --database      keep the SuperLink state (runs, registered SuperNode keys) in
                  STATE/superlink.db instead of in memory
  --timeout S     seconds to wait for the port (default 60)
  --foreground    exec flower-superlink in the foreground (logs to the terminal;
                  the PID file is still written)
  --insecure      no TLS and no SuperNode authentication: anyone who reaches the
                  Fleet port can join. Only for throwaway tests.
  -h, --help      show this help

Environment: the ServerApp runs as a subprocess of the SuperLink and inherits its
environment (e.g. FEDHF_DATA_DIR, HF_HUB_OFFLINE, HF_TOKEN).
STATE/superlink.addr holds H:P, STATE/superlink.control 127.0.0.1:C.
Stop it with: kill \$(cat STATE/superlink.pid)   (or local_federation.sh stop)
EOF
}

CERTS="" HOST="127.0.0.1" PORT=8000 CPORT="" STATE="superlink-state" DB=0 TIMEOUT=60 FG=0 INSECURE=0 EXPOSE=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --certs) need_value "$1" $#; CERTS="$2"; shift 2 ;;
    --host) need_value "$1" $#; HOST="$2"; shift 2 ;;
    --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
    --control-port) need_value "$1" $#; CPORT="$2"; shift 2 ;;
    --expose-control-api) EXPOSE=1; shift ;;
    --state) need_value "$1" $#; STATE="$2"; shift 2 ;;
    --database) DB=1; shift ;;
    --timeout) need_value "$1" $#; TIMEOUT="$2"; shift 2 ;;
    --foreground) FG=1; shift ;;
    --insecure) INSECURE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
check_port --port "$PORT"
[ -n "$CPORT" ] || CPORT=$((PORT + 1))
check_port --control-port "$CPORT"
[ "$CPORT" != "$PORT" ] || usage_error "--control-port must differ from --port"
{ is_uint "$TIMEOUT" && [ "$TIMEOUT" -ge 1 ]; } || usage_error "--timeout: '$TIMEOUT' is not a positive whole number"
[ -n "$HOST" ] || usage_error "--host must not be empty"
if [ "$INSECURE" -eq 1 ]; then
  [ -z "$CERTS" ] || usage_error "--insecure and --certs exclude each other"
else
  [ -n "$CERTS" ] || usage_error "--certs DIR is required (or --insecure for a throwaway test without TLS)"
  [ -d "$CERTS" ] || usage_error "--certs: '$CERTS' is not a directory"
  CERTS="$(cd "$CERTS" && pwd)"
  for f in ca.crt server.crt server.key; do
    [ -r "$CERTS/$f" ] || die "--certs: $CERTS/$f is missing or unreadable (create the files with make_certs.sh)"
  done
fi

deploy_env
require_cmd flower-superlink

mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDFILE="$STATE/superlink.pid"
LOG="$STATE/superlink.log"

old="$(read_pidfile "$PIDFILE")"
if [ -n "$old" ] && pid_alive "$old" fedhf.flower.superlink; then
  die "a SuperLink from $STATE already runs (PID $old); stop it first: kill $old"
fi
# The port check: what clients connect to (a wildcard host is reached on loopback).
probe="$HOST"
case "$HOST" in 0.0.0.0) probe=127.0.0.1 ;; ::|"[::]") probe=::1 ;; esac
# Bind test (sends nothing): also refuses a --host that is not an address of this machine.
rc=0; port_free "$HOST" "$PORT" || rc=$?
case "$rc" in
  0) ;;
  1) die "port $PORT on $HOST is already in use; choose another with --port" ;;
  *) die "cannot listen on $HOST:$PORT (see above); --host must be an address of this machine or 0.0.0.0" ;;
esac
rc=0; port_free 127.0.0.1 "$CPORT" || rc=$?
[ "$rc" -eq 0 ] || die "port $CPORT on 127.0.0.1 is already in use; choose another with --control-port"

args=(--fleet-host "$HOST" --fleet-port "$PORT" --control-host 127.0.0.1 --control-port "$CPORT"
      --disable-runtime-dependency-installation)
if [ "$EXPOSE" -eq 1 ]; then
  warn "--expose-control-api: the Control API is served on $HOST:$PORT too, without user authentication: anyone who reaches it can register node keys and submit runs that execute on every SuperNode."
  args+=(--expose-control-api)
fi
if [ "$INSECURE" -eq 1 ]; then
  warn "--insecure: no TLS (traffic unencrypted) and no SuperNode authentication (any SuperNode may join). Use only for throwaway tests."
  args+=(--insecure)
else
  args+=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key"
         --enable-supernode-auth)
  # The certificate must name the address SuperNodes and the flwr CLI use.
  if [ "$HOST" != 0.0.0.0 ] && [ "$HOST" != "::" ]; then
    san="$(openssl x509 -in "$CERTS/server.crt" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ' | tr ',' '\n' || true)"
    if ! printf '%s\n' "$san" | grep -qxF -e "IPAddress:$HOST" -e "DNS:$HOST"; then
      warn "$CERTS/server.crt does not list $HOST in its subjectAltName; clients connecting to $HOST will reject it."
    fi
  fi
fi
[ "$DB" -eq 1 ] && args+=(--database "$STATE/superlink.db")
args+=("${EXTRA[@]+"${EXTRA[@]}"}")

echo "$HOST:$PORT" >"$STATE/superlink.addr"
echo "127.0.0.1:$CPORT" >"$STATE/superlink.control"
PY="$(deploy_python)"
if [ "$FG" -eq 1 ]; then
  echo $$ >"$PIDFILE"
  info "exec $PY -m fedhf.flower.superlink ${args[*]}"
  exec "$PY" -m fedhf.flower.superlink "${args[@]}"
fi

echo "[$(date -u +%FT%TZ)] $PY -m fedhf.flower.superlink ${args[*]}" >>"$LOG"
pid="$(start_daemon "$PIDFILE" "$LOG" "$PY" -m fedhf.flower.superlink "${args[@]}")"
if ! wait_for_port "$probe" "$PORT" "$TIMEOUT" "$pid" "$LOG" || ! wait_for_port 127.0.0.1 "$CPORT" "$TIMEOUT" "$pid" "$LOG"; then
  pid_alive "$pid" && stop_pid "$pid" SuperLink 5 >/dev/null 2>&1 || true
  rm -f "$PIDFILE"
  exit 1
fi
mode="TLS + SuperNode authentication"
[ "$INSECURE" -eq 1 ] && mode="INSECURE (no TLS, no SuperNode authentication)"
echo "SuperLink running: PID $pid, Fleet API $HOST:$PORT, Control API 127.0.0.1:$CPORT$([ "$EXPOSE" -eq 1 ] && echo " and $HOST:$PORT (exposed)"), $mode"
echo "  log: $LOG"
echo "  pid: $PIDFILE"
