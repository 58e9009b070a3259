"""Stage 2, data: datasets by preset, Hub id or local files, their labels, partitions over clients, silos and
the fingerprints a node's privacy spend is kept against. Imports configuration only.
"""
