"""Stage 10, analysis: evaluate a released adapter on other data, the membership-inference audit, reports
and plots, and the experiment sweeps.
"""
