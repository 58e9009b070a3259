#!/usr/bin/env bash
# Start a Flower SuperLink (flower-superlink) with TLS and SuperNode authentication.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --certs DIR [--host H] [--port P] [--state DIR] [--database]
             [--timeout S] [--foreground] [-- EXTRA flower-superlink ARGS]
       $PROG --insecure [--host H] [--port P] [--state DIR] ...

Start flower-superlink in the background with TLS (DIR/ca.crt, DIR/server.crt,
DIR/server.key as written by make_certs.sh), SuperNode authentication
(--enable-supernode-auth: only SuperNodes whose public key was registered with
'flwr supernode register' may connect) and no runtime dependency installation.
The SuperLink serves its Fleet, Control and Runtime APIs on one HTTP(S) port.
Wait until the port accepts connections, then print the address.

Options:
  --certs DIR     directory with ca.crt, server.crt, server.key (required unless --insecure)
  --host H        address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)
  --port P        port for all APIs (default 8000)
  --state DIR     state directory (default ./superlink-state): superlink.log,
                  superlink.pid, superlink.addr and, with --database, superlink.db
  --database      keep the SuperLink state (runs, registered SuperNode keys) in
                  STATE/superlink.db instead of in memory
  --timeout S     seconds to wait for the port (default 60)
  --foreground    exec flower-superlink in the foreground (logs to the terminal;
                  the PID file is still written)
  --insecure      no TLS and no SuperNode authentication: anyone who reaches the
                  port can join and submit runs. Only for throwaway tests.
  -h, --help      show this help

Environment: the ServerApp runs as a subprocess of the SuperLink and inherits its
environment (e.g. FEDHF_DATA_DIR, HF_HUB_OFFLINE, HF_TOKEN).
Stop it with: kill \$(cat STATE/superlink.pid)   (or local_federation.sh stop)
EOF
}

CERTS="" HOST="127.0.0.1" PORT=8000 STATE="superlink-state" DB=0 TIMEOUT=60 FG=0 INSECURE=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --certs) need_value "$1" $#; CERTS="$2"; shift 2 ;;
    --host) need_value "$1" $#; HOST="$2"; shift 2 ;;
    --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
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
if [ -n "$old" ] && pid_alive "$old" flower-superlink; then
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

args=(--host "$HOST" --port "$PORT" --disable-runtime-dependency-installation)
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
if [ "$FG" -eq 1 ]; then
  echo $$ >"$PIDFILE"
  info "exec flower-superlink ${args[*]}"
  exec flower-superlink "${args[@]}"
fi

echo "[$(date -u +%FT%TZ)] flower-superlink ${args[*]}" >>"$LOG"
pid="$(start_daemon "$PIDFILE" "$LOG" flower-superlink "${args[@]}")"
if ! wait_for_port "$probe" "$PORT" "$TIMEOUT" "$pid" "$LOG"; then
  pid_alive "$pid" && stop_pid "$pid" SuperLink 5 >/dev/null 2>&1 || true
  rm -f "$PIDFILE"
  exit 1
fi
mode="TLS + SuperNode authentication"
[ "$INSECURE" -eq 1 ] && mode="INSECURE (no TLS, no SuperNode authentication)"
echo "SuperLink running: PID $pid, address $HOST:$PORT, $mode"
echo "  log: $LOG"
echo "  pid: $PIDFILE"
