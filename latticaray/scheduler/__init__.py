"""Scheduler: capacity advertisement, placement policy (sans-I/O), local resource accounting."""
