"""`ranker simulate`: simulated users with known true preferences (see docs/simulation.md)."""
