"""Stage 5, privacy: DP-SGD with Opacus and its guards, sigma planning, accounting, the node owner's policy,
client-level accounting and the ledger's arithmetic. Fails closed.
"""
