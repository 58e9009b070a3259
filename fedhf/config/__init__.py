"""Stage 1, configuration: the run config (one frozen dataclass tree, parsed once from Flower's flat run_config)
and what the environment asks (offline Hub). Imports no other stage.
"""
