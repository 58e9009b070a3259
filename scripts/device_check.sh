#!/usr/bin/env bash
# The GPU checks of issue 19, for a machine with an accelerator: the initial adapter built on CUDA equals the CPU
# one, the DP-SGD step (Opacus hooks) against the plain step on the GPU (time, peak memory), bf16 autocast, and the
# quickstart with train.device=cuda (wall time, accuracy). Prints figures, asserts only that the paths run.
# Elsewhere it says "no GPU" and exits 0. Extra arguments go to scripts/device_check.py (--skip-quickstart, --steps N).
source "$(dirname "$0")/_env.sh"
cd "$FEDHF_ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python scripts/device_check.py "$@"
