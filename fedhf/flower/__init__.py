"""Stage 7, the Flower layer: every flwr import lives here. ClientApp and mods, the ServerApp shell, fedhf's
strategy wrappers around Flower's strategies, SecAgg+, the simulation runner and the SuperLink launcher.
"""
