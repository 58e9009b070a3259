"""Fault injection, for testing how the server copes with failing and misbehaving clients.

Not for normal use. A node fails when it is asked to train in a given round:

- deployment: node config ``fail-at-round=R fail-mode=MODE`` on that SuperNode;
- simulation (no per-node config there): ``FEDHF_TEST_FAULTS="PARTITION:ROUND:MODE[,...]"``.

Modes: ``raise`` (the ClientApp raises), ``exit`` (the process dies), ``hang`` (sleeps for
``fail-seconds``, default 3600: the server's round timeout catches it), and replies that a
server must refuse: ``nan``, ``inf``, ``shape`` (a tensor of the wrong shape), ``extra`` (an
unexpected tensor), ``missing`` (a tensor left out), ``norm`` (an update 1e4 times too large),
``dtype`` (a tensor in float64).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhf.errors import FedHFConfigError, InjectedFault

BEFORE = ("raise", "exit", "hang")
POISON = ("nan", "inf", "shape", "extra", "missing", "norm", "dtype")
MODES = BEFORE + POISON
ENV = "FEDHF_TEST_FAULTS"


def planned(node_config: Mapping[str, Any], partition_id: int, server_round: int) -> str | None:
    """The fault this node injects in this round, or None."""
    raw_round = node_config.get("fail-at-round")
    if raw_round not in (None, ""):
        mode = str(node_config.get("fail-mode", "raise"))
        try:
            at = int(raw_round)
        except (TypeError, ValueError):
            raise FedHFConfigError(f"node config 'fail-at-round': got {raw_round!r}; give a round number.") from None
        if mode not in MODES:
            raise FedHFConfigError(f"node config 'fail-mode': got {mode!r}; allowed: {', '.join(MODES)}.")
        return mode if at == server_round else None
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        try:
            pid, rnd, mode = item.split(":")
            pid_i, rnd_i = int(pid), int(rnd)
        except ValueError:
            raise FedHFConfigError(f"{ENV}: got {item!r}; write PARTITION:ROUND:MODE, e.g. 1:2:raise.") from None
        if mode not in MODES:
            raise FedHFConfigError(f"{ENV}: mode {mode!r}; allowed: {', '.join(MODES)}.")
        if pid_i == partition_id and rnd_i == server_round:
            return mode
    return None


def before_training(mode: str | None, node_config: Mapping[str, Any]) -> None:
    if mode == "raise":
        raise InjectedFault("injected fault: this client fails its round (fault injection)")
    if mode == "exit":
        os._exit(17)
    if mode == "hang":
        time.sleep(float(node_config.get("fail-seconds", 3600)))


def poison_values(mode: str | None, trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained adapter spoiled before encoding (nan, inf, norm); unchanged for other modes."""
    if mode not in ("nan", "inf", "norm"):
        return trained
    out = dict(trained)
    first = sorted(out)[0]
    v = np.array(out[first], dtype=np.float32, copy=True)
    if mode == "nan":
        v.flat[0] = np.nan
    elif mode == "inf":
        v.flat[-1] = np.inf
    else:
        v = v * 1e4 + 1e4
    out[first] = v
    return out


def poison_structure(mode: str | None, payload: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoded payload spoiled (shape, extra, missing, dtype); unchanged for other modes."""
    if mode not in ("shape", "extra", "missing", "dtype"):
        return payload
    out = dict(payload)
    first = sorted(out)[0]
    v = out[first]
    if mode == "shape":
        out[first] = np.zeros((v.shape[0] + 1, *v.shape[1:]), dtype=v.dtype)
    elif mode == "extra":
        out["base_model.model.injected.weight"] = np.zeros(4, dtype=v.dtype)
    elif mode == "missing":
        del out[first]
    else:
        out[first] = v.astype(np.float64)
    return out
