"""Data-parallel runs under torchrun (gloo on CPU): 2 processes give what 1 process gives for
the same global batch, evaluation is sharded exactly, and a dead rank ends the others with a
clear error instead of a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from refit_gym import distributed
from refit_gym.backbones import load_backbone
from refit_gym.cli import main
from refit_gym.distributed import Distributed, GradientSum

# Per-chunk seeds make the draws independent of which process rolls a chunk out; 4 chunks of a
# batch, 2 on each of 2 processes, so a rank sums chunk gradients before the all-reduce.
REFIT = ["--set", "epochs=2", "--set", "users_per_epoch=96", "--set", "users_per_batch=24",
         "--set", "users_per_chunk=6", "--set", "checkpoint_every=2"]


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    # From tmp_path: at the repository root `-m` would import the source folder, not the
    # installed package. One thread per process: two processes share the CI's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "refit_gym.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """This process at one thread, as every torchrun process (:func:`_torchrun`): the results
    compared bit for bit hold for the same number of threads per process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _finetune_args(env_id: str, checkpoint: Path, out: Path) -> list[str]:
    return ["finetune", "--env", env_id, "--algo", "refit", "--checkpoint", str(checkpoint),
            "--out", str(out), "--seed", "2", "--quiet", *REFIT]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("env_id", "fixture"), [
    ("ReFiT-Synthetic-v0", "pretrained_synthetic"),
    ("ReFiT-SeqSynthetic-v0", "pretrained_seq_synthetic"),
])
def test_two_processes_equal_one_process(env_id: str, fixture: str, tmp_path: Path,
                                         request) -> None:
    """8 updates on 2 processes end in bitwise the weights of 1 process; the metrics differ
    only in the order of the ranks' float64 sums."""
    checkpoint = request.getfixturevalue(fixture)
    assert main(_finetune_args(env_id, checkpoint, tmp_path / "one")) == 0
    run = _torchrun(_finetune_args(env_id, checkpoint, tmp_path / "two"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("finetune refit seed 2") == 1  # rank 0 alone reports

    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["best_epoch"] == one["best_epoch"] and len(two["history"]) == 3
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["valid"] == pytest.approx(a["valid"], abs=1e-12)
        assert b["fixed_reward"] == pytest.approx(a["fixed_reward"], rel=1e-12)
        assert (b["train_reward"] is None) == (a["train_reward"] is None)
        if a["train_reward"] is not None:
            assert b["train_reward"] == pytest.approx(a["train_reward"], rel=1e-12)
    assert two["test"] == pytest.approx(one["test"], abs=1e-12)
    # The last weights (selection may keep the start): bit for bit.
    last = [torch.load(tmp_path / run / "state.pt", weights_only=True)["model"]
            for run in ("one", "two")]
    pretrained, _ = load_backbone(checkpoint)
    moved = False
    for key, value in last[0].items():
        assert torch.equal(last[1][key], value), key
        moved |= not torch.equal(value, pretrained.state_dict()[key])
    assert moved  # equal weights are not just the untouched start


@pytest.mark.usefixtures("one_thread")
def test_pretraining_and_sharded_evaluation_under_torchrun(pretrained_seq_synthetic: Path,
                                                           tmp_path: Path) -> None:
    """2-process pretraining writes one selected checkpoint; its 2-process evaluation (3
    sampling seeds over 2 ranks) equals the 1-process evaluation."""
    out = tmp_path / "pre"
    run = _torchrun(["pretrain", "--env", "ReFiT-SeqSynthetic-v0", "--out", str(out),
                     "--max-epochs", "5", "--quiet"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 5 and metrics["test"]["hr@20"] > 0
    for name, checkpoint in (("own", out / "denoiser.pt"), ("fixture", pretrained_seq_synthetic)):
        single = tmp_path / f"{name}-1.json"
        assert main(["evaluate", "--env", "ReFiT-SeqSynthetic-v0", "--checkpoint",
                     str(checkpoint), "--json", str(single), "--quiet"]) == 0
        sharded = tmp_path / f"{name}-2.json"
        run = _torchrun(["evaluate", "--env", "ReFiT-SeqSynthetic-v0", "--checkpoint",
                         str(checkpoint), "--json", str(sharded), "--quiet"], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        a, b = json.loads(single.read_text()), json.loads(sharded.read_text())
        for split in ("valid", "test", "test_std", "test_unseen"):
            assert b[split] == pytest.approx(a[split], abs=1e-12), split


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DYING_RANK = """
import os, sys, torch
from refit_gym.distributed import DistributedError, init_from_environment, shutdown
group, _ = init_from_environment("cpu")
group.sum_(torch.ones(1))  # both ranks are up
if group.rank == 1:
    os._exit(3)  # dies without a word, as a SIGKILLed worker would
try:
    group.sum_(torch.ones(1))
except DistributedError as err:
    print("CLEAR ERROR:", err)
    shutdown()  # leave the group before exiting, as the CLI does
    sys.exit(0)
sys.exit("the collective returned although rank 1 was dead")
"""


def _two_ranks(script: str, cwd: Path) -> list[subprocess.Popen]:
    """``script`` started as ranks 0 and 1 of a 2-process gloo group (no torchrun)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "REFIT_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def test_a_dead_rank_ends_the_others_with_a_clear_error(tmp_path: Path) -> None:
    procs = _two_ranks(DYING_RANK, tmp_path)
    out, err = procs[0].communicate(timeout=120)  # a hang fails here
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == 3
    assert procs[0].returncode == 0, err[-2000:]
    assert "rank 0 of 2" in out and "Rerun the same command to resume" in out


GRADIENTS = """
import torch
from refit_gym.distributed import init_from_environment, shutdown
group, _ = init_from_environment("cpu")
both, rank1_only, neither = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
both.grad = torch.full((3,), group.rank + 1.0)
if group.rank == 1:
    rank1_only.grad = torch.tensor([1.0, 2.0, 3.0])
group.sum_gradients([both, rank1_only, neither])
assert both.grad.tolist() == [3.0, 3.0, 3.0], both.grad
assert rank1_only.grad.tolist() == [1.0, 2.0, 3.0], rank1_only.grad
assert neither.grad is None
print("OK")
shutdown()  # leave the group before exiting (gloo's threads abort an exit without it)
"""


def test_gradients_are_summed_and_missing_ones_stay_missing(tmp_path: Path) -> None:
    for proc in _two_ranks(GRADIENTS, tmp_path):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "OK", err[-2000:]


def test_a_sum_of_piece_gradients_does_not_depend_on_their_order() -> None:
    """GradientSum gives bitwise one total whichever order the pieces come in (as they do on
    another number of ranks), where float32 additions in another order give another total."""
    pieces = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) * 10.0 ** (i - 2)
              for i in range(4)]

    def total(order: list[int]) -> torch.Tensor:
        param, missing = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(
            torch.zeros(2))
        gradient = GradientSum([param, missing])
        for i in order:
            param.grad = pieces[i].clone()
            gradient.add()
            assert param.grad is None  # the next piece starts from none
        gradient.reduce(Distributed())
        assert missing.grad is None and param.grad.dtype == torch.float32
        return param.grad

    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 0, 3, 1]]
    assert all(torch.equal(total(order), total(orders[0])) for order in orders[1:])
    assert torch.equal(total([2]), pieces[2])  # one piece: its gradient, unchanged
    float32 = [pieces[a] + pieces[b] + pieces[c] + pieces[d] for a, b, c, d in orders]
    assert not all(torch.equal(f, float32[0]) for f in float32[1:])


def test_single_process_commands_refuse_torchrun(pretrained_synthetic: Path, tmp_path: Path,
                                                 monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--env", "ReFiT-Synthetic-v0", "--algos", "pop", "--seeds", "1",
                 "--out", str(tmp_path / "bench"), "--quiet"]) == 2
    assert "runs in one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(distributed, "_current", Distributed(rank=0, world_size=2))
    from refit_gym.mdp.gym_env import cached_dataset
    from refit_gym.specs import load_env_spec
    from refit_gym.training.finetune import finetune

    with pytest.raises(ValueError, match="Stable-Baselines3 has no distributed training"):
        finetune(load_env_spec("ReFiT-Synthetic-v0"), cached_dataset("ReFiT-Synthetic-v0", None),
                 pretrained_synthetic, "ppo", tmp_path / "ppo", progress=False)


def test_single_process_group_is_the_identity() -> None:
    group = Distributed()
    tensor = torch.arange(4.0)
    assert group.sum_(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert group.sum_floats([1.5, 2.0]) == [1.5, 2.0] and group.max_float(3.0) == 3.0
    assert list(group.share(range(5))) == [0, 1, 2, 3, 4]
    assert list(Distributed(rank=1, world_size=2).share(range(5))) == [1, 3]
    assert group.broadcast({"a": 1}) == {"a": 1} and group.is_main and not group.active
