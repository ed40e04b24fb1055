"""Tests of shardkv.client: the treq-based API client and its blocking form."""
