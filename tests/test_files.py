"""llava_cot_jax.files: atomic writes leave the complete new version or the old one, with the umask's permissions."""

import json
import os
import stat

import pytest

from llava_cot_jax import files


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_uses_the_umask_and_replaces(tmp_path, umask_022):
    path = tmp_path / "a.json"
    path.write_text("old")
    files.write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert _mode(path) == 0o644  # what open(path, "w") gives, not mkstemp's 0o600
    files.write_text_atomic(tmp_path / "b.txt", "hé")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "hé"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_write(path, "wb") as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(ValueError, match="mode"), files.atomic_write(path, "a"):
        pass


def test_atomic_directory(tmp_path, umask_022):
    out = tmp_path / "ckpt"
    with files.atomic_directory(out) as tmp:
        assert not out.exists()  # nothing under the final name while the block runs
        open(os.path.join(tmp, "f"), "w").close()
    assert os.listdir(out) == ["f"]
    assert _mode(out) == 0o755  # not mkdtemp's 0o700
    with pytest.raises(FileExistsError), files.atomic_directory(out):
        pass
    with pytest.raises(RuntimeError), files.atomic_directory(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "g"), "w").close()
        raise RuntimeError("interrupted")
    assert os.listdir(out) == ["f"]  # the old version survives a failed rewrite
    with files.atomic_directory(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "g"), "w").close()
    assert os.listdir(out) == ["g"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporaries or set-aside copies left
