"""Offline experiments that check the model against published results."""
