"""The README's Python snippets run as written (on the synthetic environment)."""

from __future__ import annotations

import re
from pathlib import Path

from refit_gym.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(tmp_path: Path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the snippets write under runs/, as the main job does
    assert main(["pretrain", "--env", "ReFiT-Synthetic-v0",
                 "--out", "runs/demo/ReFiT-Synthetic-v0/seed1/pretrain",
                 "--max-epochs", "5", "--quiet"]) == 0
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "runs" / "ppo_diffusion.zip").is_file()
    assert (tmp_path / "runs" / "refit" / "finetuned.pt").is_file()
