"""benchmarks/common.py: result files are written whole or not at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common


def test_an_interrupted_result_write_leaves_the_old_file_whole(tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    path = common.write_result("study", "A study", ["| a | 1 |"], folder=tmp_path)
    old = path.read_text()
    assert old.startswith("# A study\n") and "| a | 1 |" in old

    def killed(self: Path, text: str, *args, **kwargs) -> int:
        """The process dies halfway through writing the file."""
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        common.write_result("study", "A study, rerun", ["| a | 2 |"], folder=tmp_path)
    monkeypatch.undo()
    assert path.read_text() == old
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
