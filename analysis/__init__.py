"""Offline analysis of the served log: the experiment report (scipy, statsmodels; no torch)."""
