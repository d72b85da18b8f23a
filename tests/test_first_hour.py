"""A researcher's first hour (issue 28): the env works with plain SB3 and Gymnasium's wrappers,
and bad settings get one clear line before any work starts."""

from __future__ import annotations

import io
import json
import re
import sys
from importlib import resources
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecMonitor

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym import specs
from refit_gym.backbones import CheckpointError, load_backbone
from refit_gym.backbones.checkpoint import CHECKPOINT_FORMAT
from refit_gym.cli import main
from refit_gym.data import SequenceData, load_dataset
from refit_gym.data.loading import SEQUENTIAL_FORMATS
from refit_gym.data.progress import Progress, announce
from refit_gym.mdp.gym_env import ReFiTEnv, ReFiTVectorEnv
from refit_gym.mdp.sb3_vec_env import ReFiTVecEnv
from refit_gym.specs import (
    agent_settings,
    agent_tables,
    check_agent_hyperparams,
    load_agent_hyperparams,
)

SYN = "ReFiT-Synthetic-v0"
STEPS = 10  # the synthetic id's chain length (envs/synthetic.toml [diffusion] steps)


@pytest.mark.parametrize("wrap", [lambda env: env, Monitor], ids=["plain", "monitor"])
def test_plain_sb3_ppo_learns_on_gym_make(wrap) -> None:
    """SB3 keeps its episode statistics under info["episode"]; the env must not use that key."""
    model = PPO("MultiInputPolicy", wrap(gym.make(SYN)), n_steps=20, batch_size=20, n_epochs=1,
                seed=0, device="cpu")
    model.learn(40)
    episodes = list(model.ep_info_buffer)
    assert len(episodes) == 40 // STEPS
    assert all(ep["l"] == STEPS and 0.0 <= ep["r"] <= 1.0 for ep in episodes)


# SB3 first asks for render_mode="rgb_array", which Gymnasium warns about and the env refuses
# with a TypeError; SB3 then makes it without.
@pytest.mark.filterwarnings("ignore:.*render_mode='rgb_array':UserWarning")
def test_sb3_make_vec_env_by_id_as_rl_zoo3_builds_envs() -> None:
    """rl-zoo3 builds its training envs with SB3's make_vec_env from the id string (the module
    prefix imports the package), each gym.make'd env under a Monitor."""
    venv = make_vec_env(f"refit_gym:{SYN}", n_envs=2, seed=0)
    model = PPO("MultiInputPolicy", venv, n_steps=10, batch_size=20, n_epochs=1, seed=0,
                device="cpu")
    model.learn(40)
    assert [ep["l"] for ep in model.ep_info_buffer] == [STEPS] * 4


def test_record_episode_statistics_wraps_the_env() -> None:
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(SYN))
    obs, info = env.reset(seed=0, options={"episode": 3})
    assert info["episode_id"] == 3 and "episode" not in info
    for _ in range(STEPS):
        obs, reward, terminated, _, info = env.step(obs["x"])
    assert terminated and info["episode_id"] == 3
    assert info["episode"]["l"] == STEPS and info["episode"]["r"] == pytest.approx(reward)


def test_make_vec_sync_with_wrappers() -> None:
    venv = gym.make_vec(SYN, num_envs=2, vectorization_mode="sync",
                        wrappers=[gym.wrappers.RecordEpisodeStatistics])
    obs, info = venv.reset(seed=0)
    assert info["episode_id"].shape == (2,)
    for _ in range(STEPS):
        obs, rewards, terminated, _, info = venv.step(obs["x"])
    assert terminated.all() and info["_episode"].all()
    np.testing.assert_array_equal(info["episode"]["l"], [STEPS, STEPS])
    np.testing.assert_allclose(info["episode"]["r"], rewards)


def test_make_vec_entry_point_with_vector_episode_statistics() -> None:
    venv = gym.wrappers.vector.RecordEpisodeStatistics(gym.make_vec(SYN, num_envs=3))
    obs, info = venv.reset(seed=0, options={"episodes": [4, 5, 6]})
    np.testing.assert_array_equal(info["episode_id"], [4, 5, 6])
    for _ in range(STEPS):
        obs, rewards, terminated, _, info = venv.step(obs["x"])
    assert terminated.all() and info["_episode"].all()
    np.testing.assert_array_equal(info["episode_id"], [4, 5, 6])  # the episodes that ended
    np.testing.assert_array_equal(info["episode"]["l"], [STEPS] * 3)
    np.testing.assert_allclose(info["episode"]["r"], rewards)


def test_sb3_vec_monitor_over_the_batched_vec_env() -> None:
    venv = VecMonitor(ReFiTVecEnv(SYN, num_envs=2, seed=0))
    obs = venv.reset()
    for _ in range(STEPS):
        obs, rewards, dones, infos = venv.step(obs["x"])
    assert dones.all()
    assert [info["episode"]["l"] for info in infos] == [STEPS, STEPS]
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], rewards, rtol=1e-5)
    assert all(isinstance(info["episode_id"], int) for info in infos)


def test_reset_refuses_option_keys_it_would_ignore() -> None:
    env = ReFiTEnv(SYN)
    with pytest.raises(ValueError, match=r"unknown keys \['episodes'\]; allowed: \['episode'\]"):
        env.reset(seed=0, options={"episodes": 3})
    venv = ReFiTVectorEnv(SYN, 2)
    with pytest.raises(ValueError, match=r"unknown keys \['episode'\]; allowed: \['episodes'\]"):
        venv.reset(seed=0, options={"episode": 3})
    with pytest.raises(ValueError, match=r"one episode id per row, shape \(2,\), got shape \(3,\)"):
        venv.reset(seed=0, options={"episodes": [1, 2, 3]})
    with pytest.raises(TypeError, match="takes one int here: the 2 rows are one batch"):
        venv.reset(seed=[0, 1])  # Gymnasium's per-env seeds: one generator serves every row


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": "5"}, r"steps = '5' \(str\); steps takes int or None"),
    ({"steps": 0}, "steps = 0; steps must be >= 1"),
    ({"holdout": 1}, r"holdout = 1 \(int\); holdout takes str"),
    ({"checkpoint": "x.pt"}, r"\['checkpoint'\] applies to sequential ids only"),
    ({"data_dir": "/data"}, r"data_dir applies to ids with data files; .* generated"),
    ({"device": "gpu"}, "device: 'gpu' is not a torch device; use auto"),
    ({"reward_params": {"k": 0}}, r"k = 0: the ranking cut-off must be an integer in \[1, 400\]"),
    ({"reward_params": {"k": 401}}, r"k = 401: .* in \[1, 400\]"),
    ({"reward_params": {"k": 2.5}}, r"k = 2.5: .* in \[1, 400\]"),
])
def test_make_refuses_bad_keywords_in_one_line(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message) as error:
        gym.make(SYN, **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can use CUDA")
def test_cuda_without_a_usable_gpu_is_one_line(capsys) -> None:
    with pytest.raises(ValueError, match="'cuda': no CUDA GPU is usable here"):
        gym.make(SYN, device="cuda")
    with pytest.raises(SystemExit):
        main(["pretrain", "--env", SYN, "--device", "cuda"])
    err = capsys.readouterr().err
    assert "argument --device: 'cuda': no CUDA GPU is usable here" in err
    assert err.count("\n") == 1


def test_sequential_default_checkpoint_error_names_where_it_looked(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        gym.make("ReFiT-SeqSynthetic-v0")
    looked = Path.cwd() / "runs" / "ReFiT-SeqSynthetic-v0" / "pretrain-seed1" / "denoiser.pt"
    assert f"at {looked} (the default," in str(error.value)
    assert "under the current directory" in str(error.value)
    assert "`refit-gym pretrain --env ReFiT-SeqSynthetic-v0 --seed 1`" in str(error.value)
    named = tmp_path / "models" / "mine.pt"
    with pytest.raises(CheckpointError) as error:
        gym.make("ReFiT-SeqSynthetic-v0", checkpoint=str(named))
    assert (f"`refit-gym pretrain --env ReFiT-SeqSynthetic-v0 --out {named.parent}` writes "
            f"{named.parent / 'denoiser.pt'}") in str(error.value)


def test_finetune_without_checkpoint_takes_pretrains_default_or_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        pretrained_synthetic: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--env", SYN, "--algo", "refit", "--seed", "2", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert (f"no --checkpoint given and none at the default runs/{SYN}/pretrain-seed2/denoiser.pt"
            in err and f"`refit-gym pretrain --env {SYN} --seed 2`" in err)
    default = tmp_path / "runs" / SYN / "pretrain-seed2" / "denoiser.pt"
    default.parent.mkdir(parents=True)
    default.write_bytes(pretrained_synthetic.read_bytes())
    report = tmp_path / "refit.json"
    assert main(["finetune", "--env", SYN, "--algo", "refit", "--seed", "2", "--quiet",
                 "--set", "epochs=1", "--set", "users_per_epoch=64", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["checkpoint"] == str(default.relative_to(tmp_path))


def test_continue_without_a_budget_says_which_seconds(
        pretrained_synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--env", SYN, "--algo", "continue", "--checkpoint",
                 str(pretrained_synthetic), "--out", str(tmp_path / "c"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "needs a wall-time budget, --budget-seconds S" in err and "wall_time_s" in err
    assert not (tmp_path / "c").exists()  # refused before any work


def test_no_advice_to_upgrade_a_v0_id_to_its_v1(pretrained_seq_synthetic: Path) -> None:
    import warnings

    from refit_gym.mdp.registration import hide_version_advice

    with warnings.catch_warnings(record=True) as caught:  # pytest resets filters per test
        warnings.simplefilter("always")
        hide_version_advice()  # what `import refit_gym` does
        gym.make("ReFiT-SeqSynthetic-v0", checkpoint=str(pretrained_seq_synthetic))
        warnings.warn("\x1b[33mWARN: The environment Other-v0 is out of date.",
                      DeprecationWarning, stacklevel=1)  # another package's ids keep it
    assert [str(w.message) for w in caught if "out of date" in str(w.message)] == [
        "\x1b[33mWARN: The environment Other-v0 is out of date."]


def test_vector_faces_group_rows_and_report_reset_infos() -> None:
    venv = gym.make_vec(SYN, num_envs=6, group_size=3)
    assert venv.group_size == 3
    _, info = venv.reset(seed=0)
    np.testing.assert_array_equal(info["episode_id"], venv.core.episodes.numpy())
    still = np.zeros(venv.action_space.shape, np.float32)
    for _ in range(2):  # the first episodes, then the ones autoreset drew
        groups = venv.core.episodes.numpy().reshape(2, 3)
        assert (groups == groups[:, :1]).all()
        for _ in range(venv.core.steps):
            venv.step(still)
    _, info = venv.reset(seed=0, options={"episodes": np.repeat([4, 9], 3)})
    np.testing.assert_array_equal(info["episode_id"], [4, 4, 4, 9, 9, 9])
    with pytest.raises(ValueError, match=r"with group_size 3, reset option 'episodes' must "
                       r"repeat each id over its 3 consecutive rows .* np.repeat\(ids, 3\)"):
        venv.reset(seed=0, options={"episodes": [4, 4, 4, 9, 9, 8]})
    with pytest.raises(ValueError, match=r"num_envs \(4\) must be a positive multiple of "
                       r"group_size \(3\)"):
        gym.make_vec(SYN, num_envs=4, group_size=3)
    env = ReFiTVecEnv(SYN, num_envs=2, seed=0)
    env.reset()
    first = [{"episode_id": int(e), "t": env.core.steps} for e in env.core.episodes]
    assert env.reset_infos == first
    for _ in range(env.core.steps):  # autoreset: the reset infos name the new episodes
        env.step(np.zeros(env.action_space.shape, np.float32)[None].repeat(2, 0))
    assert env.reset_infos == [{"episode_id": int(e), "t": env.core.steps}
                               for e in env.core.episodes]


def test_another_ids_checkpoint_is_refused_unless_its_model_is_the_same(
        pretrained_seq_synthetic: Path, capsys) -> None:
    import dataclasses

    # Same data, so the same items: only what the checkpoint records tells DreamRec from ADRec.
    with pytest.raises(CheckpointError, match="belongs to ReFiT-SeqSynthetic-v0, whose backbone "
                       "differs from ReFiT-SeqSynthetic-v1's; pretrain one for "
                       r"ReFiT-SeqSynthetic-v1 \(`refit-gym pretrain --env ReFiT-SeqSynthetic-v1`"):
        gym.make("ReFiT-SeqSynthetic-v1", checkpoint=str(pretrained_seq_synthetic))
    assert main(["finetune", "--env", "ReFiT-SeqSynthetic-v1", "--algo", "refit", "--checkpoint",
                 str(pretrained_seq_synthetic), "--quiet"]) != 0
    assert "belongs to ReFiT-SeqSynthetic-v0, whose backbone differs" in capsys.readouterr().err
    # A copy of the id that changes only its MDP reuses the backbone; one that changes the
    # model is told which field differs.
    spec = specs.load_env_spec("ReFiT-SeqSynthetic-v0")
    copy = dataclasses.replace(spec, id="Mine-v0", env={**spec.env, "steps": 5})
    model, payload = copy.load_backbone(pretrained_seq_synthetic, 300)
    assert payload["env_id"] == "ReFiT-SeqSynthetic-v0" and model.n_items == 300
    wider = dataclasses.replace(copy, backbone={**spec.backbone, "hidden": 48})
    with pytest.raises(CheckpointError, match=r"whose config \['hidden'\] differs from Mine-v0's"):
        wider.load_backbone(pretrained_seq_synthetic, 300)


def test_a_command_without_an_id_lists_the_ids(capsys) -> None:
    assert main(["pretrain", "--quiet"]) != 0
    assert re.search(r"name an environment: .*known ids: \[.*'ReFiT-Synthetic-v0'",
                     capsys.readouterr().err)


@pytest.mark.parametrize("content", [
    b"a text file\nnot a checkpoint\n", b"", b'{"json": 1}', np.random.default_rng(0).bytes(300),
], ids=["text", "empty", "json", "random"])
def test_a_file_that_is_no_checkpoint_raises_checkpoint_error(tmp_path, capsys, content) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is corrupt or not a PyTorch file"):
        load_backbone(path)
    assert main(["evaluate", "--env", SYN, "--checkpoint", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt or not a PyTorch file" in err and err.count("\n") == 1


def test_a_torch_file_without_the_payload_keys_is_refused(tmp_path) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "backbone": "diffrec"}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="not a refit-gym backbone checkpoint.*'config'"):
        load_backbone(tmp_path / "part.pt")


def test_agent_tables_are_checked_when_read(tmp_path, monkeypatch) -> None:
    (tmp_path / "refit.toml").write_text('["X-v0"]\nepochs = 0\n["Y-v0"]\nkappa = "wide"\n')
    monkeypatch.setattr(specs.resources, "files", lambda package: tmp_path)
    with pytest.raises(ValueError, match="agents/refit.toml for X-v0: epochs = 0; epochs must"):
        load_agent_hyperparams("refit", "X-v0")
    with pytest.raises(ValueError, match=r"Y-v0: kappa = 'wide' \(str\); kappa takes float"):
        load_agent_hyperparams("refit", "Y-v0")


def test_an_agent_table_can_be_another_ids(tmp_path, monkeypatch) -> None:
    (tmp_path / "refit.toml").write_text(
        '["A-v0"]\nepochs = 2\nlr = 1e-4\n["B-v0"]\nsame_as = "A-v0"\nlr = 3e-4\n'
        '["C-v0"]\nsame_as = "D-v0"\n')
    monkeypatch.setattr(specs.resources, "files", lambda package: tmp_path)
    assert load_agent_hyperparams("refit", "B-v0") == {"epochs": 2, "lr": 3e-4}
    with pytest.raises(specs.SpecError, match=r"\[C-v0\]: same_as = 'D-v0' must name another"):
        load_agent_hyperparams("refit", "C-v0")


def test_an_agent_file_can_extend_another_algorithms(tmp_path, monkeypatch) -> None:
    (tmp_path / "refit.toml").write_text('["A-v0"]\nepochs = 2\nlr = 1e-4\n'
                                         '["A-v0".cuda]\nepochs = 9\n')
    (tmp_path / "ddpo.toml").write_text('extends = "refit"\n[default]\nminibatches = 2\n'
                                        '["A-v0"]\nlr = 3e-5\n')
    (tmp_path / "ppo.toml").write_text('extends = "ddpo"\n')
    (tmp_path / "a2c.toml").write_text('extends = "a2c"\n')
    monkeypatch.setattr(specs.resources, "files", lambda package: tmp_path)
    assert load_agent_hyperparams("ddpo", "A-v0") == {"epochs": 2, "lr": 3e-5}
    assert load_agent_hyperparams("ddpo", "A-v0", "cuda") == {"epochs": 9, "lr": 3e-5}
    assert load_agent_hyperparams("ddpo", "B-v0") == {"minibatches": 2}
    assert agent_tables("ddpo") == {"default": {"minibatches": 2}, "A-v0": {"lr": 3e-5}}
    (tmp_path / "trpo.toml").write_text('extends = "no-such-algo"\n')
    for algo, base in (("ppo", "'ddpo'"), ("a2c", "'a2c'"), ("trpo", "'no-such-algo'")):
        with pytest.raises(specs.SpecError, match=rf"{algo}.toml: extends = {base} must name"):
            load_agent_hyperparams(algo, "A-v0")


def test_every_shipped_agent_table_passes_the_full_check() -> None:
    checked = 0
    for entry in resources.files("refit_gym.agents").iterdir():
        if not entry.name.endswith(".toml"):
            continue
        algo = entry.name.removesuffix(".toml")
        for env_id in agent_tables(algo):
            for device in ("cpu", "cuda"):
                params = load_agent_hyperparams(algo, env_id, device)
                check_agent_hyperparams(algo, params, f"{algo} {env_id}")  # unknown keys too
                checked += agent_settings(algo) is not None
    assert checked >= 4 * 2  # refit, ppo, a2c and trpo have tables


def test_sb3_hyperparameters_are_the_constructors_arguments() -> None:
    check_agent_hyperparams("ppo", {"learning_rate": 1e-4, "n_envs": 4, "group_size": 1}, "x")
    with pytest.raises(ValueError, match=r"x: unknown keys \['lr'\]; allowed: .*'learning_rate'"):
        check_agent_hyperparams("ppo", {"lr": 1e-4}, "x")
    with pytest.raises(ValueError, match="x: n_envs = 0; n_envs must be >= 1"):
        check_agent_hyperparams("a2c", {"n_envs": 0}, "x")
    with pytest.raises(ValueError, match=r"x: normalize_advantage = 1 \(int\); .* takes bool"):
        check_agent_hyperparams("ppo", {"normalize_advantage": 1}, "x")


class _Terminal(io.StringIO):
    """Standard error as a terminal: Progress draws a live bar on it."""

    def isatty(self) -> bool:
        return True


def test_epoch_lines_stay_on_screen_above_a_live_bar(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress(3, "pretrain X", unit="epoch")
    for epoch, loss in ((1, 0.5), (2, 0.25)):
        bar.advance()
        bar.epoch(f"epoch {epoch}", loss=loss, **{"valid recall@20": 0.123456789})
    bar.close()
    assert bar.bar is not None  # a live bar was drawn
    # What stays on screen: each line's text after its last carriage return.
    shown = [segment.split("\r")[-1] for segment in terminal.getvalue().split("\n")]
    epoch_lines = [line for line in shown if re.fullmatch(
        r"pretrain X: epoch \d \(\d/3 epoch, \d+ s\): loss [\d.]+, valid recall@20 0.12346",
        line)]
    assert [line.split(" (")[0] for line in epoch_lines] == ["pretrain X: epoch 1",
                                                             "pretrain X: epoch 2"]


def test_announce_prints_one_line_before_a_silent_step(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    announce("building the reward's factor cache")
    assert terminal.getvalue() == "building the reward's factor cache\n"


def test_every_registered_id_says_its_scenario(tmp_path: Path) -> None:
    """An id is sequential exactly when its dataset loads as sequences (the backbone class
    decides, the spec loader checks the two agree)."""
    known = specs.all_env_specs()
    assert {env_id for env_id, spec in known.items() if spec.sequential} == {
        env_id for env_id, spec in known.items() if spec.dataset["format"] in SEQUENTIAL_FORMATS}
    assert not known["ReFiT-ML1M-v0"].sequential and known["ReFiT-Beauty-v1"].sequential
    assert isinstance(load_dataset(known["ReFiT-SeqSynthetic-v1"].dataset), SequenceData)
    text = (resources.files("refit_gym.envs") / "seq_synthetic_adrec.toml").read_text()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(text.replace('format = "sequential-synthetic"', 'format = "synthetic"'))
    with pytest.raises(specs.SpecError, match=re.escape(
            "backbone 'adrec' is sequential and reads formats ['diffurec', 'dreamrec', "
            "'sequential-synthetic'], but [dataset] has format 'synthetic'")):
        specs.register_spec_file(wrong)
