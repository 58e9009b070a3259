"""A client's update on the wire and at the server's door. No Flower, no torch.

- ``encode`` / ``decode``: ``transport.dtype``. fp32 sends the trained adapter as it is; fp16 and
  int8 send the *update* (trained adapter - global adapter the client started from), which is
  small and centred on zero, so a coarse format loses little; the server adds it back to the
  global adapter it sent. int8 uses one scale per tensor: ``scale = max|update| / 127`` and
  ``q = round(update / scale)``, so each decoded value is within ``scale / 2`` of the original.
  fp16 rounds each value to 11 significant bits (relative error <= 2**-11; values below
  fp16's smallest normal, 6.1e-5, keep an absolute error <= 2**-25).
- ``check_update``: what the server verifies in every reply before it aggregates: exactly the
  expected tensor names, their shapes and dtypes, finite values, and the update's L2 norm
  within ``strategy.max-update-norm``. It returns the reason a reply is dropped, or None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedhf.errors import DecodeError

FP16_RELATIVE_ERROR = 2.0**-11
FP16_ABSOLUTE_ERROR = 2.0**-25  # half of fp16's smallest subnormal step
INT8_LEVELS = 127


@dataclass
class Encoded:
    arrays: dict[str, np.ndarray]  # what goes into the reply's ArrayRecord
    dtype: str
    scales: list[float]  # int8: one per tensor, in the order of ``arrays``; empty otherwise


def encode(trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], dtype: str) -> Encoded:
    """The reply payload for ``transport.dtype``; ``base`` is the global adapter the client received."""
    if dtype == "fp32":
        return Encoded({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in trained.items()}, dtype, [])
    delta = {k: np.asarray(v, dtype=np.float32) - np.asarray(base[k], dtype=np.float32) for k, v in trained.items()}
    if dtype == "fp16":
        return Encoded({k: d.astype(np.float16) for k, d in delta.items()}, dtype, [])
    if dtype == "int8":
        arrays, scales = {}, []
        for k, d in delta.items():
            peak = float(np.max(np.abs(d))) if d.size else 0.0
            if not np.isfinite(peak) or peak == 0.0:
                # A non-finite update cannot be written in int8: its scale says so (NaN/Inf), and the server drops it.
                arrays[k], scale = np.zeros(d.shape, dtype=np.int8), peak
            else:
                scale = peak / INT8_LEVELS
                arrays[k] = np.clip(np.rint(d / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
            scales.append(scale)
        return Encoded(arrays, dtype, scales)
    raise ValueError(f"unknown transport dtype {dtype!r}")  # config validation allows only the three


WIRE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


def decode(
    arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], dtype: str, scales: list[float] | None
) -> dict[str, np.ndarray]:
    """The trained adapter (fp32) from a reply payload. Raises DecodeError for a payload that does not fit."""
    wire = WIRE_DTYPES.get(dtype)
    if wire is None:
        raise DecodeError(f"unknown transport dtype {dtype!r} (the server expects {sorted(WIRE_DTYPES)})")
    bad = [k for k, v in arrays.items() if v.dtype != wire]
    if bad:
        raise DecodeError(
            f"tensor '{bad[0]}' has dtype {arrays[bad[0]].dtype}, expected {np.dtype(wire).name} "
            f"(transport.dtype={dtype})"
        )
    if dtype == "fp32":
        return dict(arrays)
    _check_names(arrays, base)
    if dtype == "fp16":
        return {k: np.asarray(base[k], dtype=np.float32) + v.astype(np.float32) for k, v in arrays.items()}
    if scales is None or len(scales) != len(arrays):
        raise DecodeError(f"int8 reply carries {0 if scales is None else len(scales)} scales for {len(arrays)} tensors")
    out = {}
    for (k, v), scale in zip(arrays.items(), scales, strict=True):
        if not (np.isfinite(scale) and scale >= 0):
            raise DecodeError(f"tensor '{k}': int8 scale {scale!r} (a non-finite update); it must be finite and >= 0")
        out[k] = np.asarray(base[k], dtype=np.float32) + v.astype(np.float32) * np.float32(scale)
    return out


def _check_names(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    extra = sorted(set(arrays) - set(reference))
    missing = sorted(set(reference) - set(arrays))
    if extra:
        raise DecodeError(f"unexpected tensor '{extra[0]}'" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    if missing:
        raise DecodeError(
            f"missing tensor '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def check_update(
    trained: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_update_norm: float
) -> tuple[str | None, float | None]:
    """(reason to drop the reply or None, L2 norm of trained - reference when it could be computed)."""
    try:
        _check_names(trained, reference)
    except DecodeError as exc:
        return str(exc), None
    sq = 0.0
    for k, ref in reference.items():
        v = trained[k]
        if v.shape != ref.shape:
            return f"tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(ref.shape)}", None
        if v.dtype != ref.dtype:
            return f"tensor '{k}' has dtype {v.dtype}, expected {ref.dtype}", None
        finite = np.isfinite(v)
        if not finite.all():
            kind = "NaN" if np.isnan(v).any() else "Inf"
            return f"tensor '{k}' holds {int((~finite).sum())} non-finite value(s) ({kind})", None
        sq += float(np.sum((v.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = float(np.sqrt(sq))
    if max_update_norm > 0 and norm > max_update_norm:
        return (f"update norm {norm:.4g} is above strategy.max-update-norm={max_update_norm:g}"), norm
    return None, norm


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the tensor values (without serialisation headers)."""
    return int(sum(v.nbytes for v in arrays.values()))
