#!/usr/bin/env bash
# Same set-up as quickstart.sh, then the test suite. Extra arguments go to pytest
# (e.g. `scripts/test.sh -m "not slow"` skips the end-to-end simulations).
source "$(dirname "$0")/_env.sh"
cd "$FEDHF_ROOT"
# Tests never use the network: Hub look-ups fail fast and fall back to local copies.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m pytest "$@"
