import pytest
import torch

from cecollm.cache.kv import KVCache
from cecollm.errors import CacheFull


def test_append_grows_and_keeps_contents():
    cache = KVCache(first_layer=4, n_layers=2, n_kv_heads=2, head_dim=3, capacity=2)
    k1, v1 = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    keys, values = cache.append(4, 0, k1, v1)
    assert cache.capacity >= 3 and keys.shape == (1, 2, 3, 3)
    k2, v2 = torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3)
    keys, values = cache.append(4, 3, k2, v2)
    torch.testing.assert_close(keys[0], torch.cat([k1, k2], dim=2)[0])
    torch.testing.assert_close(values[0], torch.cat([v1, v2], dim=2)[0])
    assert cache.length(4) == 4 and cache.length(5) == 0


def test_append_must_be_contiguous():
    cache = KVCache(0, 1, 1, 2)
    with pytest.raises(AssertionError):
        cache.append(0, 1, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_given_storage_has_fixed_capacity():
    storage = torch.zeros(1, 2, 1, 4, 2)
    cache = KVCache(0, 1, 1, 2, storage=storage)
    cache.append(0, 0, torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    assert storage[0, 0].sum() == 8, "writes land in the given storage"
    with pytest.raises(CacheFull):
        cache.append(0, 4, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert cache.nbytes == storage.numel() * 4
