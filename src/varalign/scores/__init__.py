"""Scorers: each turns one shard (or an in-memory array) into a column of numbers."""
