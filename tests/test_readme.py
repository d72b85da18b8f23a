"""The README's quickstart commands and Python snippets run as written (on the synthetic
environments)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from refit_gym.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands(text: str) -> list[list[str]]:
    """The `refit-gym ...` command lines of the Quickstart's first bash block, continuation
    lines joined and comments dropped, as argument lists for :func:`main`."""
    quickstart = text.split("\n## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quickstart, flags=re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["refit-gym"]:
            commands.append(words[1:])
    return commands


def test_quickstart_and_python_snippets_run(tmp_path: Path, monkeypatch) -> None:
    text = README.read_text()
    commands = quickstart_commands(text)
    assert [c[0] for c in commands] == ["pretrain", "finetune"]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the commands and snippets write under runs/
    pretrain, finetune = commands
    assert main([*pretrain, "--quiet"]) == 0
    # The one change to the README's command: one epoch instead of the id's 8 keeps the suite
    # fast; the checkpoint path it names must be the one pretrain wrote.
    assert main([*finetune, "--quiet", "--set", "epochs=1"]) == 0
    assert (tmp_path / "runs" / "ReFiT-Synthetic-v0" / "refit-seed1" / "finetuned.pt").is_file()
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "runs" / "ppo_diffusion.zip").is_file()
    assert (tmp_path / "runs" / "refit" / "finetuned.pt").is_file()
