"""Heterogeneous-rank LoRA (``strategy.lora-aggregation = svd``): average the products, give each client its rank.

FedAvg of LoRA averages A and B separately, which is not the average of the clients' updates B·A, and it needs
every client at one rank. Here (in the manner of FlexLoRA / HLoRA) the server averages the products
``P = Σ w_i B_i A_i / Σ w_i`` of each LoRA layer and keeps the best rank-``model.lora.r`` approximation of P (its
truncated SVD), written as ``B = U_r S_r``, ``A = V_r^T``. A client whose owner set a smaller rank
(node config ``lora-rank``) starts from the rank-``r_i`` truncation of the global product, trains its own
rank-``r_i`` LoRA and sends it at that rank; the server pads it with zeros to the global rank (the same product)
before averaging. Every client's LoRA has the same scaling (``alpha / model.lora.r``: a client at rank ``r_i``
uses ``lora_alpha = alpha * r_i / r``), so products are comparable.

Before the first update (B = 0, so P = 0) a client takes the seed's A (its first ``r_i`` rows) and B = 0, as plain
LoRA does. The SVD's signs are made canonical (the largest entry of each column of U positive), so the server
rebuilds exactly the start a client computed (it needs it to decode fp16 / int8 updates and to bound their norm).
Pure numpy; no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

A_MARK, B_MARK = ".lora_A.", ".lora_B."


def lora_pairs(state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """LoRA A key -> its B key, for every LoRA layer of an adapter state."""
    return {k: k.replace(A_MARK, B_MARK) for k in state if A_MARK in k and k.replace(A_MARK, B_MARK) in state}


def rank_of(state: Mapping[str, np.ndarray]) -> int | None:
    """The LoRA rank of a state (the rows of its A matrices), or None without LoRA tensors."""
    ranks = {int(state[a].shape[0]) for a in lora_pairs(state)}
    if len(ranks) > 1:
        raise ValueError(f"LoRA layers of one adapter have different ranks {sorted(ranks)}")  # built so by fedhf
    return ranks.pop() if ranks else None


def _svd(product: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) = (U_r S_r, V_r^T) of the best rank-``rank`` approximation of ``product``, with canonical signs."""
    u, s, vt = np.linalg.svd(product, full_matrices=False)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    flip = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    flip[flip == 0] = 1.0
    u, vt = u * flip, vt * flip[:, None]
    b, a = u * s, vt
    if rank > b.shape[1]:  # a rank above min(out, in): pad (the product cannot hold more)
        b = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        a = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
    return b, a


def truncate(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The adapter a client at ``rank`` starts from: each layer's product truncated to ``rank`` (the rest as is).
    At the adapter's own rank it is the adapter itself; before any update (B = 0), the seed's A rows and B = 0."""
    out = {k: np.asarray(v) for k, v in state.items()}
    current = rank_of(state)
    if current is None or rank == current:
        return out
    for a_key, b_key in lora_pairs(state).items():
        a, b = np.asarray(state[a_key]), np.asarray(state[b_key])
        if not np.any(b):
            out[a_key] = a[:rank].copy()
            out[b_key] = np.zeros((b.shape[0], rank), dtype=b.dtype)
            continue
        nb, na = _svd(b.astype(np.float64) @ a.astype(np.float64), rank)
        out[a_key], out[b_key] = na.astype(a.dtype), nb.astype(b.dtype)
    return out


def pad(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """A client's rank-``r_i`` adapter written at ``rank`` >= r_i with zero rows of A and columns of B: the same
    products."""
    out = {k: np.asarray(v) for k, v in state.items()}
    for a_key, b_key in lora_pairs(state).items():
        a, b = out[a_key], out[b_key]
        extra = rank - a.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad rank {a.shape[0]} down to {rank}")  # a bug: callers check the rank
        out[a_key] = np.pad(a, ((0, extra), (0, 0)))
        out[b_key] = np.pad(b, ((0, 0), (0, extra)))
    return out


def aggregate_products(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], rank: int
) -> dict[str, np.ndarray]:
    """The global adapter from the clients' (padded) adapters: per LoRA layer the rank-``rank`` SVD truncation of
    the weighted mean of the products B_i A_i; every other tensor (the head) the weighted mean."""
    if not states or len(states) != len(weights):
        raise ValueError("aggregate_products needs one weight per state")  # a bug, not input
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    pairs = lora_pairs(states[0])
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in pairs.items():
        product = sum(
            wi * (np.asarray(s[b_key], np.float64) @ np.asarray(s[a_key], np.float64))
            for wi, s in zip(w, states, strict=True)
        )
        dtype = np.asarray(states[0][a_key]).dtype
        if not np.any(product):
            out[a_key] = np.asarray(states[0][a_key])[:rank].copy()
            out[b_key] = np.zeros((product.shape[0], rank), dtype=dtype)
            continue
        b, a = _svd(product, rank)
        out[a_key], out[b_key] = a.astype(dtype), b.astype(dtype)
    lora = set(pairs) | set(pairs.values())
    for key in states[0]:
        if key not in lora:
            out[key] = sum(wi * np.asarray(s[key], np.float64) for wi, s in zip(w, states, strict=True)).astype(
                np.asarray(states[0][key]).dtype
            )
    return out


def max_rank(state: Mapping[str, np.ndarray]) -> int:
    """The largest rank every LoRA layer's product can hold: min(out, in) over the layers."""
    return min(min(state[b].shape[0], state[a].shape[1]) for a, b in lora_pairs(state).items())
