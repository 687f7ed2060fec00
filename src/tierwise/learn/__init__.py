"""Federated learning: client updates, their compression, partitions and aggregation."""
