"""A data owner's policy, read from the node config and enforced by the node itself. No torch, no Flower.

The party a data owner needs protection from is the server and whoever submits runs, so a node
never takes privacy parameters on the run config's word: it compares every train request with
its owner's policy and refuses, naming the rule, what breaks it. A refusal carries no update and
nothing computed from the node's data (no counts, no losses, no epsilon).

Node config keys (``flower-supernode --node-config``; under ``fedhf run`` one table per simulated
node in a ``--node-config`` TOML file; never from the run config):

- ``min-privacy`` = ``none`` | ``client`` | ``sample``: the least privacy a run must have. ``sample``:
  DP-SGD in this node (``privacy.mode`` sample or both), which the node applies itself.
  ``client``: client-level DP (``privacy.mode`` client or both), which the *server* applies: a node
  that asks for it relies on the server's word (see docs/threat-model.md). Default ``none``, or
  ``sample`` when ``max-epsilon`` is set (a budget only means something under sample-level DP).
- ``max-epsilon``: the node's lifetime sample-level budget on its data, over every run.
- ``max-delta``: the largest delta a run may ask for; default 1 / (the node's training rows).
- ``require-secure-aggregation`` = true | false: send updates only inside SecAgg+.
- ``share``: what may leave the node besides the update and the privacy accounting, a comma list
  of :data:`SHAREABLE` names, ``all`` or ``none``. Default: everything when the run has no DP
  (there is no guarantee to exceed), nothing under DP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedhf.errors import FedHFConfigError

PRIVACY_LEVELS = ("none", "client", "sample")

# What a client can send besides its update and its privacy accounting; each one is outside the
# sample-level guarantee (computed from the data without noise), so under DP it leaves the node only
# when the owner's policy names it.
SHAREABLE: dict[str, str] = {
    "num-examples": "the number of training rows (and with it the averaging weight)",
    "label-histogram": "the number of training rows per label",
    "train-loss": "the mean training loss (forward passes without DP noise)",
    "train-tokens": "the number of tokens trained on",
    "timings": "train-seconds and handler-seconds of the round",
    "local-eval": "loss, the run's two metrics (accuracy and macro-F1; for a causal LM exact match and token F1, or "
    "next-token accuracy top 1 and top 5) and row count of the node's held-out rows",
}

POLICY_KEYS = ("min-privacy", "max-epsilon", "max-delta", "require-secure-aggregation", "share")


@dataclass(frozen=True)
class NodePolicy:
    min_privacy: str = "none"
    max_epsilon: float | None = None
    max_delta: float | None = None  # None: 1 / (training rows)
    require_secure_aggregation: bool = False
    share: frozenset[str] | None = None  # None: the default (all without DP, none under DP)

    def shared(self, dp: bool) -> frozenset[str]:
        """The optional fields this node sends in a run with (``dp``) or without differential privacy."""
        if self.share is not None:
            return self.share
        return frozenset() if dp else frozenset(SHAREABLE)

    def delta_ceiling(self, num_examples: int) -> float:
        return self.max_delta if self.max_delta is not None else 1.0 / max(num_examples, 1)

    def describe(self) -> str:
        parts = [f"min-privacy={self.min_privacy}"]
        if self.max_epsilon is not None:
            parts.append(f"max-epsilon={self.max_epsilon:g}")
        parts.append(f"max-delta={self.max_delta:g}" if self.max_delta is not None else "max-delta=1/n")
        parts.append(f"require-secure-aggregation={str(self.require_secure_aggregation).lower()}")
        if self.share is None:
            parts.append("share=default (all without DP, none under DP)")
        else:
            parts.append("share=" + (",".join(sorted(self.share)) or "none"))
        return " ".join(parts)


@dataclass(frozen=True)
class Refusal:
    """Why a node will not train for a request: the node-config key (or run key) and one plain sentence."""

    rule: str
    reason: str

    def text(self) -> str:
        return f"refused by the node's policy ({self.rule}): {self.reason}"


def _number(node_config: Mapping[str, Any], key: str, example: str) -> float | None:
    raw = node_config.get(key)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        value = float(raw) if not isinstance(raw, bool) else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or not math.isfinite(value):
        raise FedHFConfigError(f"node config '{key}': got {raw!r}; give a positive number, e.g. {key}={example}.")
    return value


def parse_policy(node_config: Mapping[str, Any]) -> NodePolicy:
    """The owner's policy from a node config; errors name the key, the value and the fix."""
    budget = _number(node_config, "max-epsilon", "4.0")
    delta = _number(node_config, "max-delta", "1e-5")
    if delta is not None and delta >= 1:
        raise FedHFConfigError(
            f"node config 'max-delta': got {node_config['max-delta']!r}; delta must be below 1, "
            "e.g. max-delta=1e-5 (the default is 1 / the node's training rows)."
        )
    raw_level = node_config.get("min-privacy")
    if raw_level is None or (isinstance(raw_level, str) and not raw_level.strip()):
        level = "sample" if budget is not None else "none"
    else:
        level = str(raw_level).strip().lower()
        if level not in PRIVACY_LEVELS:
            raise FedHFConfigError(
                f"node config 'min-privacy': got {raw_level!r}; allowed: {', '.join(PRIVACY_LEVELS)}."
            )
        if budget is not None and level != "sample":
            raise FedHFConfigError(
                f"node config 'max-epsilon' is a sample-level budget, but 'min-privacy' is {level!r}: a run without "
                "sample-level DP would spend outside it. Use min-privacy=sample (the default with max-epsilon)."
            )
    raw_secagg = node_config.get("require-secure-aggregation", False)
    if isinstance(raw_secagg, bool):
        secagg = raw_secagg
    elif isinstance(raw_secagg, str) and raw_secagg.strip().lower() in ("true", "false", ""):
        secagg = raw_secagg.strip().lower() == "true"
    else:
        raise FedHFConfigError(f"node config 'require-secure-aggregation': got {raw_secagg!r}; give true or false.")
    return NodePolicy(level, budget, delta, secagg, _parse_share(node_config.get("share")))


def _parse_share(raw: Any) -> frozenset[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise FedHFConfigError(
            f"node config 'share': got {raw!r}; give a comma list of {', '.join(SHAREABLE)}, or all, or none."
        )
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if names in (["none"], []):
        return frozenset()
    if names == ["all"]:
        return frozenset(SHAREABLE)
    unknown = [n for n in names if n not in SHAREABLE]
    if unknown:
        raise FedHFConfigError(
            f"node config 'share': '{unknown[0]}' is not something fedhf can share; allowed: "
            f"{', '.join(SHAREABLE)}, all, none."
        )
    return frozenset(names)


def check_request(policy: NodePolicy, *, mode: str, secure: bool, noise_multiplier: float | None) -> Refusal | None:
    """The rules that do not depend on the node's data: the privacy level and secure aggregation.

    ``mode`` is the run's privacy.mode, ``secure`` whether this train message came through SecAgg+,
    ``noise_multiplier`` sigma when sigma is given (not planned from a target epsilon).
    """
    sample = mode in ("sample", "both")
    client = mode in ("client", "both")
    if policy.min_privacy == "sample" and not sample:
        return Refusal(
            "min-privacy",
            f"this node trains only with sample-level DP (min-privacy=sample); the run asks privacy.mode={mode!r}.",
        )
    if policy.min_privacy == "sample" and noise_multiplier is not None and not noise_multiplier > 0:
        return Refusal(
            "min-privacy",
            f"privacy.noise-multiplier={noise_multiplier:g} adds no noise: that is not "
            "differential privacy (min-privacy=sample).",
        )
    if policy.min_privacy == "client" and not client:
        return Refusal(
            "min-privacy",
            f"this node trains only with client-level DP (min-privacy=client); the run asks privacy.mode={mode!r}.",
        )
    if policy.require_secure_aggregation and not secure:
        return Refusal(
            "require-secure-aggregation",
            "this node sends its update only inside SecAgg+ "
            "(require-secure-aggregation=true); this train request is not "
            "part of the SecAgg+ protocol.",
        )
    return None


def check_delta(policy: NodePolicy, delta: float, num_examples: int) -> Refusal | None:
    """The run's delta against the node's ceiling (the ceiling's value is not quoted: by default it is 1/n)."""
    if not 0 < delta < 1 or delta > policy.delta_ceiling(num_examples):
        what = f"max-delta={policy.max_delta:g}" if policy.max_delta is not None else "1 / its training rows"
        return Refusal(
            "max-delta",
            f"the run's delta {delta:.3g} is above this node's ceiling ({what}); a delta that "
            "large allows releasing training rows outright.",
        )
    return None
