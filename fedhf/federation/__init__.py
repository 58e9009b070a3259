"""Stage 6, federation without Flower: one client round (preflight, reservation, training, reply), every
reply field and tensor checked, updates on the wire, a node's saved spend, test fault injection, and the
RoundObserver protocol the Flower layer reports to.
"""
