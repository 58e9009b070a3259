"""fedhf: privacy-aware federated fine-tuning of Hugging Face models with Flower."""

import os

# fedhf sends nothing anywhere that the user did not ask for: Flower's and Ray's usage
# telemetry stay off unless the user turns them on explicitly.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

__version__ = "0.1.0"
