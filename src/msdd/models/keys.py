"""What identifies a tensor's values for the caches of the fast inference path (`msdd.models.caches` says what they
keep): a key that changes when the tensor is replaced, moved or changed in place."""

from __future__ import annotations

import torch


def version_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's values: its storage (held by the key: no new tensor can take its address), offset,
    shape, dtype and in-place version (none for inference tensors: they cannot change in place)."""
    if t is None:
        return None
    storage = t.untyped_storage()
    return (storage, storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype,
            0 if t.is_inference() else t._version)


def address_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's values as `version_key` does, without the storage: as telling where the key's keeper
    also holds the storage (`Linear.panels` does), so that no new tensor can take its address."""
    if t is None:
        return None
    return (t.data_ptr(), t.shape, t.dtype, 0 if t.is_inference() else t._version)
