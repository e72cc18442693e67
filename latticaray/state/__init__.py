"""Cluster state: signed delta-CRDTs with gossip and anti-entropy (sans-I/O core + asyncio driver)."""
