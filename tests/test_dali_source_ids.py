"""``SourceIds``: DALI ``source_info`` rows -> ids for shards without an ``id`` field, vectorised over the batch,
against a plain-Python reading of the same strings (the loop it replaced). No DALI needed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dissect_fast.data.dali_loader import SourceIds, _Shard


def _shard(path: str, offsets, first_id: int) -> _Shard:
    offsets = np.asarray(offsets, dtype=np.int64)
    return _Shard(
        path,
        path + ".idx",
        len(offsets),
        Counter(),
        offsets=offsets,
        offset_ids=first_id + np.arange(len(offsets), dtype=np.int64),
    )


def _rows(strings: list[str]) -> np.ndarray:
    raw = [s.encode() for s in strings]
    out = np.zeros((len(raw), max(map(len, raw)) + 3), dtype=np.uint8)  # zero padded, as fn.pad leaves them
    for i, r in enumerate(raw):
        out[i, : len(r)] = np.frombuffer(r, dtype=np.uint8)
    return out


def _reference(strings, shards):
    table = {s.path: dict(zip(s.offsets.tolist(), s.offset_ids.tolist())) for s in shards}
    ids = []
    for s in strings:
        i = s.find(":")
        while i != -1 and s[:i] not in table:
            i = s.find(":", i + 1)
        ids.append(table[s[:i]][int(s[i + 1 : s.index(":", i + 1)])])
    return ids


def test_matches_the_string_lookup():
    rng = np.random.default_rng(0)
    paths = ["/d/a.tar", "/d/b.tar", "/data/x:y/shard-000001.tar", "/d/a", "/data/x:y/shard-000002.tar", "/z.tar"]
    shards = [
        _shard(p, np.sort(rng.choice(10**9 if i else 10**12, 50, replace=False)) + 512, i * 1000)
        for i, p in enumerate(paths)
    ]
    strings = []
    for _ in range(300):
        s = shards[rng.integers(len(shards))]
        k = rng.integers(len(s.offsets))
        strings.append(f"{s.path}:{s.offsets[k]}:{int(s.offset_ids[k]):09d}:odd.jpg")
    got = SourceIds(shards)(_rows(strings))
    assert got.dtype == np.int64
    assert got.tolist() == _reference(strings, shards)


def test_unknown_shard_or_offset_is_a_clear_error():
    shards = [_shard("/d/a.tar", [512, 2048], 0)]
    lookup = SourceIds(shards)
    with pytest.raises(KeyError, match="no shard"):
        lookup(_rows(["/d/b.tar:512:k.jpg"]))
    with pytest.raises(KeyError, match="offset"):
        lookup(_rows(["/d/a.tar:1024:k.jpg"]))
    assert lookup(_rows(["/d/a.tar:2048:k.jpg", "/d/a.tar:512:k.jpg"])).tolist() == [1, 0]
