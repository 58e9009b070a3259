#!/usr/bin/env bash
# Write or update a SuperLink connection ([superlink.NAME]) in $FLWR_HOME/config.toml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --address HOST:PORT --ca CA_CERT [--default] [--flwr-home DIR]
       $PROG --name NAME --address HOST:PORT --insecure [--default] [--flwr-home DIR]
       $PROG --name NAME --remove [--flwr-home DIR]

Add or replace the SuperLink connection NAME in \$FLWR_HOME/config.toml (FLWR_HOME
defaults to ~/.flwr), the file the flwr CLI reads for 'flwr run . NAME', 'flwr ls NAME',
'flwr log RUN_ID NAME', 'flwr supernode register KEY NAME', ... Other entries are kept.
A missing file is created with Flower's own defaults first. The entry written is:

  [superlink.NAME]
  address = "HOST:PORT"
  root-certificates = "/absolute/path/to/ca.crt"     (or: insecure = true)

Options:
  --name NAME        connection name (letters, digits, '_' and '-')
  --address H:P      the SuperLink's address as the CLI reaches it (its --host/--port)
  --ca FILE          CA certificate the SuperLink's certificate is signed with (stored
                     as an absolute path, which Flower requires)
  --insecure         connect without TLS (only for a SuperLink started with --insecure)
  --default          also make NAME the default connection ([superlink] default = NAME)
  --remove           delete the connection NAME
  --flwr-home DIR    use DIR instead of \$FLWR_HOME
  -h, --help         show this help
EOF
}

NAME="" ADDRESS="" CA="" INSECURE=0 DEFAULT=0 REMOVE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$1" $#; NAME="$2"; shift 2 ;;
    --address) need_value "$1" $#; ADDRESS="$2"; shift 2 ;;
    --ca) need_value "$1" $#; CA="$2"; shift 2 ;;
    --insecure) INSECURE=1; shift ;;
    --default) DEFAULT=1; shift ;;
    --remove) REMOVE=1; shift ;;
    --flwr-home) need_value "$1" $#; export FLWR_HOME="$2"; shift 2 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$NAME" ] || usage_error "--name NAME is required"
[[ "$NAME" =~ ^[A-Za-z0-9_-]+$ ]] || usage_error "--name: '$NAME' may contain only letters, digits, '_' and '-'"
[ "$NAME" != default ] || usage_error "--name: 'default' is reserved by Flower"
if [ "$REMOVE" -eq 1 ]; then
  [ -z "$ADDRESS$CA" ] && [ "$INSECURE" -eq 0 ] && [ "$DEFAULT" -eq 0 ] || usage_error "--remove takes only --name (and --flwr-home)"
else
  [ -n "$ADDRESS" ] || usage_error "--address HOST:PORT is required"
  split_hostport "$ADDRESS" || usage_error "--address: '$ADDRESS' is not HOST:PORT"
  if [ "$INSECURE" -eq 1 ]; then
    [ -z "$CA" ] || usage_error "--ca and --insecure exclude each other"
  else
    [ -n "$CA" ] || usage_error "--ca CA_CERT is required (or --insecure for a SuperLink without TLS)"
    [ -r "$CA" ] || usage_error "--ca: '$CA' is missing or unreadable"
    CA="$(cd "$(dirname "$CA")" && pwd)/$(basename "$CA")"
  fi
fi

deploy_env
FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}"
FLWR_HOME="$(abspath "$FLWR_HOME")"
export FLWR_HOME
mkdir -p "$FLWR_HOME"
CONFIG="$FLWR_HOME/config.toml"

"$(deploy_python)" - "$CONFIG" "$NAME" "$ADDRESS" "$CA" "$INSECURE" "$DEFAULT" "$REMOVE" <<'PY'
import os, sys, tempfile
path, name, address, ca, insecure, make_default, remove = sys.argv[1:]
try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib
try:
    import tomli_w
except ImportError:
    sys.exit("error: the Python package tomli_w (a Flower dependency) is missing; activate the venv with Flower installed")

if os.path.exists(path):
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            sys.exit(f"error: {path} is not valid TOML ({e}); fix or move it away first")
else:
    try:  # Flower's own defaults ([superlink] default = "local", plus "local" and "supergrid")
        from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
        doc = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
    except Exception:
        doc = {}

sl = doc.setdefault("superlink", {})
if not isinstance(sl, dict):
    sys.exit(f"error: {path}: 'superlink' is not a table")
if remove == "1":
    if name not in sl:
        sys.exit(f"error: no connection '{name}' in {path}")
    del sl[name]
    action, note = "removed", ""
    if sl.get("default") == name:
        del sl["default"]
        if isinstance(sl.get("local"), dict):
            sl["default"] = "local"
            note = "the default connection is 'local' (Flower's local simulation) again"
        else:
            note = "there is no default connection now"
else:
    entry = {"address": address}
    if insecure == "1":
        entry["insecure"] = True
    else:
        entry["root-certificates"] = ca
    action, note = ("updated" if name in sl else "added"), ""
    sl[name] = entry
    if make_default == "1":
        sl["default"] = name

# Flower writes 'default' first, then one table per connection.
ordered = {"default": sl["default"]} if "default" in sl else {}
ordered.update((k, v) for k, v in sl.items() if k != "default")
doc["superlink"] = ordered

fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".config.toml.")
with os.fdopen(fd, "wb") as f:
    tomli_w.dump(doc, f)
if os.path.exists(path):
    os.chmod(tmp, os.stat(path).st_mode & 0o777)
else:
    os.chmod(tmp, 0o644)
os.replace(tmp, path)
print(f"connection '{name}' {action} in {path}")
if note:
    print(f"note: {note}")
PY

if [ "$REMOVE" -eq 0 ]; then
  [ "$INSECURE" -eq 1 ] && warn "connection '$NAME' is insecure: the flwr CLI talks to $ADDRESS without TLS."
  echo "use it with: FLWR_HOME=$FLWR_HOME flwr run . $NAME --stream"
fi
