"""SecAgg+ masked vectors travel as uint32 and reach Flower's workflow as the int64 arrays the mod produced."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes

from fedpriv.runtime.masked_vectors import MASKED, SECAGG_CONFIGS, MaskedVectorError, pack, widen


def _reply(*vectors: np.ndarray, **extra) -> RecordDict:
    return RecordDict({SECAGG_CONFIGS: ConfigRecord({MASKED: [ndarray_to_bytes(v) for v in vectors], **extra})})


def _vectors(content: RecordDict) -> list[np.ndarray]:
    return [bytes_to_ndarray(b) for b in content.config_records[SECAGG_CONFIGS][MASKED]]


def test_packing_halves_the_bytes_and_widening_gives_back_the_very_same_int64_arrays():
    rng = np.random.default_rng(0)
    flower = [rng.integers(0, 2**32, size=50_000, dtype=np.int64), np.array([0, 2**32 - 1], dtype=np.int64)]
    content = _reply(*flower, stage="collect_masked_vectors")
    before = sum(len(b) for b in content.config_records[SECAGG_CONFIGS][MASKED])
    pack(content)
    packed = _vectors(content)
    assert [v.dtype for v in packed] == [np.dtype("<u4")] * 2
    assert sum(len(b) for b in content.config_records[SECAGG_CONFIGS][MASKED]) < 0.51 * before
    widen(content)
    for got, sent in zip(_vectors(content), flower, strict=True):
        assert got.dtype == np.int64 and np.array_equal(got, sent)
    assert content.config_records[SECAGG_CONFIGS]["stage"] == "collect_masked_vectors"  # the rest untouched


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (np.array([0, 2**32], dtype=np.int64), "outside"),
        (np.array([-1, 5], dtype=np.int64), "outside"),
        (np.array([0.5, 1.0]), "dtype float64"),
    ],
)
def test_a_value_that_does_not_fit_32_bits_is_refused_never_truncated(vector, message):
    with pytest.raises(MaskedVectorError, match=message):
        pack(_reply(vector))


def test_int64_vectors_pass_and_other_dtypes_are_refused_on_arrival():
    wide = np.array([1, 2, 3], dtype=np.int64)
    content = widen(_reply(wide))
    assert np.array_equal(_vectors(content)[0], wide)
    for dtype in (np.float32, np.int16, np.uint64):
        with pytest.raises(MaskedVectorError, match="expected uint32"):
            widen(_reply(np.array([1, 2], dtype=dtype)))


def test_replies_of_other_stages_and_messages_are_left_alone():
    other = RecordDict({SECAGG_CONFIGS: ConfigRecord({"stage": "share_keys"})})
    assert pack(other) is other and widen(RecordDict()) is not None
