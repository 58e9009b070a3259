"""What the environment asks of fedhf (read at call time, never cached)."""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """Whether the user asked huggingface_hub to stay offline (HF_HUB_OFFLINE), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
