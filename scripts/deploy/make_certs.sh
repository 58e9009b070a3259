#!/usr/bin/env bash
# Self-made CA and a SuperLink TLS certificate signed by it (openssl).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --out DIR --hosts "127.0.0.1,localhost,10.0.0.5" [--days N] [--force]

Create a certificate authority and a SuperLink server certificate signed by it:
  DIR/ca.key      CA private key (mode 600)
  DIR/ca.crt      CA certificate: give it to every SuperNode (--root-certificates)
                  and to the flwr CLI (root-certificates in \$FLWR_HOME/config.toml)
  DIR/server.key  SuperLink private key (mode 600)
  DIR/server.crt  SuperLink certificate, subjectAltName = every host in --hosts
                  (IP: entries for IP addresses, DNS: entries for names) and
                  127.0.0.1 (where the Control API listens)

Options:
  --out DIR       output directory (created if absent)
  --hosts LIST    comma-separated addresses and names the SuperLink is reached at;
                  the first one is also the certificate's common name
  --days N        validity of both certificates in days (default 365)
  --force         overwrite existing files in DIR
  -h, --help      show this help

WARNING: this is a self-made CA for tests and small trials. Real deployments should
issue the SuperLink certificate from their own PKI.

Example:
  $PROG --out certs --hosts "127.0.0.1,localhost"
EOF
}

OUT="" HOSTS="" DAYS=365 FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) need_value "$1" $#; OUT="$2"; shift 2 ;;
    --hosts) need_value "$1" $#; HOSTS="$2"; shift 2 ;;
    --days) need_value "$1" $#; DAYS="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$OUT" ] || usage_error "--out DIR is required"
[ -n "$HOSTS" ] || usage_error "--hosts is required (e.g. --hosts \"127.0.0.1,localhost\")"
{ is_uint "$DAYS" && [ "$DAYS" -ge 1 ]; } || usage_error "--days: '$DAYS' is not a positive whole number"
require_cmd openssl

# subjectAltName entries: IP: for IPv4/IPv6 addresses, DNS: for names.
SAN="" CN="" n=0
IFS=',' read -r -a host_list <<<"$HOSTS"
for h in "${host_list[@]}"; do
  h="${h//[[:space:]]/}"
  [ -z "$h" ] && continue
  if [[ "$h" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
    IFS='.' read -r -a oct <<<"$h"
    for o in "${oct[@]}"; do [ "$((10#$o))" -le 255 ] || usage_error "--hosts: '$h' is not a valid IPv4 address"; done
    entry="IP:$h"
  elif [[ "$h" == *:* ]]; then
    [[ "$h" =~ ^[0-9A-Fa-f:.]+$ ]] || usage_error "--hosts: '$h' is not a valid IPv6 address"
    entry="IP:$h"
  elif [[ "$h" =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$ ]]; then
    entry="DNS:$h"
  else
    usage_error "--hosts: '$h' is neither an IP address nor a DNS name"
  fi
  [ -z "$CN" ] && CN="$h"
  SAN="${SAN:+$SAN,}$entry"
  n=$((n + 1))
done
[ "$n" -ge 1 ] || usage_error "--hosts: no host given"
# The Control API listens on 127.0.0.1 only (start_superlink.sh): the flwr CLI, on the SuperLink's machine or
# through an SSH tunnel, connects there, so the certificate always names the loopback address too.
case ",$SAN," in *,IP:127.0.0.1,*) ;; *) SAN="$SAN,IP:127.0.0.1" ;; esac

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
FILES=(ca.key ca.crt server.key server.crt)
if [ "$FORCE" -eq 0 ]; then
  existing=""
  for f in "${FILES[@]}"; do [ -e "$OUT/$f" ] && existing="$existing $f"; done
  [ -z "$existing" ] || die "refusing to overwrite existing files in $OUT:$existing (use --force)"
fi

warn "this is a self-made CA for tests and small trials; real deployments should use their own PKI."

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077

# CA: key + self-signed certificate.
openssl genrsa -out "$tmp/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$DAYS" \
  -subj "/O=fedhf test CA/CN=fedhf self-made CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.crt" 2>/dev/null

# Server: key + CSR + certificate signed by the CA with the SANs.
openssl genrsa -out "$tmp/server.key" 4096 2>/dev/null
openssl req -new -key "$tmp/server.key" -subj "/O=fedhf/CN=$CN" -out "$tmp/server.csr" 2>/dev/null
cat >"$tmp/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EOF
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days "$DAYS" -sha256 -extfile "$tmp/ext.cnf" -out "$tmp/server.crt" 2>/dev/null
openssl verify -CAfile "$tmp/ca.crt" "$tmp/server.crt" >/dev/null || die "openssl could not verify the new server certificate"

for f in "${FILES[@]}"; do
  cp -f "$tmp/$f" "$OUT/$f"
done
chmod 600 "$OUT/ca.key" "$OUT/server.key"
chmod 644 "$OUT/ca.crt" "$OUT/server.crt"

echo "CA certificate:     $OUT/ca.crt"
echo "CA key:             $OUT/ca.key (keep private)"
echo "SuperLink cert:     $OUT/server.crt  (subjectAltName: $SAN, valid $DAYS days)"
echo "SuperLink key:      $OUT/server.key (keep private)"
