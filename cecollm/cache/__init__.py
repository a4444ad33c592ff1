"""KV caches of decoder layers."""

from cecollm.cache.kv import KVCache

__all__ = ["KVCache"]
