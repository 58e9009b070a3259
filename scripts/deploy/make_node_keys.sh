#!/usr/bin/env bash
# One P-384 ECDSA key pair per SuperNode, for SuperNode authentication.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --out DIR (--nodes N | --names "silo-a silo-b") [--force]

Create one ECDSA P-384 key pair per SuperNode (ssh-keygen -t ecdsa -b 384, no passphrase):
  DIR/NAME       private key (mode 600): stays on the SuperNode's machine
                 (flower-supernode --auth-supernode-private-key DIR/NAME)
  DIR/NAME.pub   public key: registered with the SuperLink by the federation's operator
                 (flwr supernode register DIR/NAME.pub CONNECTION)

Options:
  --out DIR        output directory (created if absent)
  --nodes N        N key pairs named node-0 .. node-(N-1)
  --names "A B"    key pairs with these names (space- or comma-separated; letters,
                   digits, '.', '_' and '-')
  --force          overwrite existing key files
  -h, --help       show this help

Example:
  $PROG --out keys --names "silo-a silo-b"
EOF
}

OUT="" NODES="" NAMES="" FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) need_value "$1" $#; OUT="$2"; shift 2 ;;
    --nodes) need_value "$1" $#; NODES="$2"; shift 2 ;;
    --names) need_value "$1" $#; NAMES="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$OUT" ] || usage_error "--out DIR is required"
[ -n "$NODES" ] && [ -n "$NAMES" ] && usage_error "give either --nodes or --names, not both"
list=()
if [ -n "$NODES" ]; then
  { is_uint "$NODES" && [ "$NODES" -ge 1 ]; } || usage_error "--nodes: '$NODES' is not a positive whole number"
  for ((i = 0; i < NODES; i++)); do list+=("node-$i"); done
elif [ -n "$NAMES" ]; then
  read -r -a list <<<"${NAMES//,/ }"
  [ "${#list[@]}" -ge 1 ] || usage_error "--names: no name given"
  for n in "${list[@]}"; do
    [[ "$n" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || usage_error "--names: '$n' is not a valid name (letters, digits, '.', '_', '-')"
  done
  dups="$(printf '%s\n' "${list[@]}" | sort | uniq -d)"
  [ -z "$dups" ] || usage_error "--names: duplicate name(s): $(echo $dups)"
else
  usage_error "give --nodes N or --names \"A B\""
fi
require_cmd ssh-keygen

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ "$FORCE" -eq 0 ]; then
  existing=""
  for n in "${list[@]}"; do
    for f in "$n" "$n.pub"; do [ -e "$OUT/$f" ] && existing="$existing $f"; done
  done
  [ -z "$existing" ] || die "refusing to overwrite existing files in $OUT:$existing (use --force)"
fi

for n in "${list[@]}"; do
  rm -f "$OUT/$n" "$OUT/$n.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedhf-$n" -f "$OUT/$n" </dev/null >/dev/null
  chmod 600 "$OUT/$n"
  chmod 644 "$OUT/$n.pub"
  echo "$n: private $OUT/$n  public $OUT/$n.pub"
done
