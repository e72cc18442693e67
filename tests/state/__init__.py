"""Tests of latticaray.state (signed delta-CRDTs, replication, typed collections)."""
