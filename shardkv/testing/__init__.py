"""Test doubles and harnesses for shardkv: in-memory clusters, real processes,
history checkers."""
