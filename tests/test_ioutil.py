"""dissect_fast.ioutil: atomic writes leave the old file or the new one, never a half-written one or a stray tmp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dissect_fast.ioutil import atomic_write, write_json_atomic, write_text_atomic


def test_replace_and_failure(tmp_path):
    p = tmp_path / "a.json"
    write_json_atomic(p, {"x": 1}, indent=1)
    assert json.loads(p.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError), atomic_write(p) as f:
        f.write('{"x": ')
        raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"x": 1}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json"]
    write_text_atomic(p, "new", fsync=False)
    assert p.read_text() == "new"


def test_binary(tmp_path):
    p = tmp_path / "r.npz"
    with atomic_write(p, "wb") as f:
        np.savez(f, a=np.arange(3))
    assert np.load(p)["a"].tolist() == [0, 1, 2]
