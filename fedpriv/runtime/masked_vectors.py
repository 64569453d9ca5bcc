"""SecAgg+ masked vectors on the wire as 32-bit words instead of Flower's 64-bit ones.

Flower's ``secaggplus_mod`` uploads each masked vector as int64 (``ndarray_to_bytes`` of the result of
``parameters_mod(..., mod_range)``), although every value lies in ``[0, mod_range)`` and the workflow
only accepts ``mod_range <= 2**32``: half of every byte a node uploads in the masked stage is zeros.
The node packs the vectors into uint32 (``pack``); the coordinator widens them back to int64 (``widen``)
before Flower's ``SecAggPlusWorkflow`` sums them, so Flower's arithmetic runs on exactly the arrays it
produced. Nothing is rounded: a value that does not fit 32 bits is refused, never truncated.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

SECAGG_CONFIGS = "secaggplus_configs"  # flwr...secaggplus_constants.RECORD_KEY_CONFIGS
MASKED = "masked_params"  # flwr...secaggplus_constants.Key.MASKED_PARAMETERS
WIRE_DTYPE = np.dtype("<u4")
WIDE_DTYPE = np.dtype("<i8")
WORD = 2**32


class MaskedVectorError(ValueError):
    """A masked vector that is not what SecAgg+ produces (wrong dtype, or values outside 32 bits)."""


def _each_vector(content: RecordDict, convert) -> RecordDict:
    """Apply ``convert`` (ndarray, blob -> blob) to every masked vector of a reply, in place."""
    record = content.config_records.get(SECAGG_CONFIGS)
    if record is not None and MASKED in record:
        record[MASKED] = [convert(bytes_to_ndarray(blob), blob) for blob in record[MASKED]]
    return content


def _packed(vector: np.ndarray, blob: bytes) -> bytes:
    if vector.dtype.kind not in "iu":
        raise MaskedVectorError(f"masked vector of dtype {vector.dtype}: SecAgg+ produces integers")
    if vector.size and (int(vector.min()) < 0 or int(vector.max()) >= WORD):
        raise MaskedVectorError("masked vector has values outside [0, 2**32): check secure_aggregation's modulus")
    return ndarray_to_bytes(vector.astype(WIRE_DTYPE))


def _widened(vector: np.ndarray, blob: bytes) -> bytes:
    if vector.dtype == WIRE_DTYPE:
        return ndarray_to_bytes(vector.astype(WIDE_DTYPE))
    if vector.dtype == WIDE_DTYPE:
        return blob
    raise MaskedVectorError(f"masked vector of dtype {vector.dtype}: expected uint32 (or int64)")


def pack(content: RecordDict) -> RecordDict:
    """A node's reply: its masked vectors as uint32 (in place; replies of other stages are left as they are)."""
    return _each_vector(content, _packed)


def widen(content: RecordDict) -> RecordDict:
    """A reply as the coordinator received it: packed vectors back to int64 for Flower's workflow (in place).

    Vectors already int64 (a node of an earlier fedpriv) pass unchanged; any other dtype is refused.
    """
    return _each_vector(content, _widened)
