"""safeunits.io: atomic writes leave nothing behind on failure; JSON and safetensors round trip exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from safeunits.errors import PathIsDirectoryError, UserError
from safeunits.io import atomic_path, load_safetensors, read_json, save_safetensors, write_json, write_text


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list((tmp_path / "sub").iterdir()) == []  # neither the target nor a temporary file
    write_json(target, {"v": 1})
    with pytest.raises(TypeError):  # not serialisable: fails while writing, after the temp file exists
        write_json(target, {"v": object()})
    assert read_json(target) == {"v": 1} and [p.name for p in (tmp_path / "sub").iterdir()] == ["out.json"]


def test_json_round_trip(tmp_path):
    obj = {"a": [1, 2.5, None], "b": {"c": "ü ✓"}, "path": Path("x/y"), "t": torch.tensor([1.0, 2.0]),
           "n": torch.tensor(3), "inf": math.inf}
    write_json(tmp_path / "o.json", obj)
    back = read_json(tmp_path / "o.json")
    assert back == {"a": [1, 2.5, None], "b": {"c": "ü ✓"}, "path": "x/y", "t": [1.0, 2.0], "n": 3, "inf": math.inf}
    write_text(tmp_path / "t.txt", "line\n")
    assert (tmp_path / "t.txt").read_text() == "line\n"


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(4, 3), "b16": torch.randn(5).to(torch.bfloat16), "i": torch.arange(6, dtype=torch.int8),
               "view": torch.randn(6, 4).t()}  # non-contiguous input is made contiguous
    save_safetensors(tmp_path / "t.safetensors", tensors, {"format": "test"})
    back = load_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "test"}


def test_user_errors_for_missing_bad_or_folder_targets(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        read_json(tmp_path / "missing.json")
    assert isinstance(err.value, FileNotFoundError)  # still the builtin a caller may catch
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PathIsDirectoryError, match="is a folder"):
        write_json(tmp_path / "folder", {"a": 1})
    assert list((tmp_path / "folder").iterdir()) == []  # nothing written into or beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "folder"]
