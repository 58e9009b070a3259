#!/usr/bin/env bash
# Create .venv if absent, install fedhf, run a federated LoRA fine-tune in simulation:
# 3 clients, IID SST-2, 1,200 training rows, 3 rounds. Extra arguments go to `fedhf run`.
source "$(dirname "$0")/_env.sh"
cd "$FEDHF_ROOT"
exec fedhf run --num-clients 3 "$@"
