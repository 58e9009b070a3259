#!/usr/bin/env bash
# Register a SuperNode's public key with a SuperLink (wraps 'flwr supernode register').
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --connection NAME --key DIR/NODE.pub [--name NODE_NAME] [--flwr-home DIR]

Register the SuperNode public key with the SuperLink behind connection NAME (an
entry [superlink.NAME] in \$FLWR_HOME/config.toml, see connection.sh). A SuperLink
started with --enable-supernode-auth only accepts SuperNodes whose key is registered.
This is the same as:

  flwr supernode register DIR/NODE.pub NAME [--name NODE_NAME]

Other useful commands:
  flwr supernode list NAME                 registered SuperNodes, their IDs and status
  flwr supernode unregister NODE_ID NAME   revoke a SuperNode

Options:
  --connection NAME  SuperLink connection in \$FLWR_HOME/config.toml
  --key FILE         the SuperNode's public key (NODE.pub from make_node_keys.sh)
  --name NODE_NAME   a name shown by 'flwr supernode list'
  --flwr-home DIR    use DIR instead of \$FLWR_HOME (default ~/.flwr)
  -h, --help         show this help
EOF
}

CONN="" KEY="" NODE_NAME=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --connection) need_value "$1" $#; CONN="$2"; shift 2 ;;
    --key) need_value "$1" $#; KEY="$2"; shift 2 ;;
    --name) need_value "$1" $#; NODE_NAME="$2"; shift 2 ;;
    --flwr-home) need_value "$1" $#; export FLWR_HOME="$2"; shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$CONN" ] || usage_error "--connection NAME is required"
[ -n "$KEY" ] || usage_error "--key FILE is required"
[ -r "$KEY" ] || usage_error "--key: '$KEY' is missing or unreadable"
case "$(head -c 40 "$KEY")" in
  ecdsa-sha2-nistp384\ *) ;;
  "-----BEGIN"*) usage_error "--key: '$KEY' looks like a private key; give the public key (NODE.pub)" ;;
  *) usage_error "--key: '$KEY' is not an ECDSA P-384 public key in OpenSSH format (ecdsa-sha2-nistp384 ...); create one with make_node_keys.sh" ;;
esac

deploy_env
require_cmd flwr
cmd=(flwr supernode register "$KEY" "$CONN")
[ -n "$NODE_NAME" ] && cmd+=(--name "$NODE_NAME")
exec "${cmd[@]}"
