from __future__ import annotations

import json
from pathlib import Path

import pytest

from refit_gym.cli import main
from refit_gym.specs import SpecError, load_env_spec

KEYS = {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}


def test_every_spec_parses_and_unknown_ids_fail() -> None:
    for env_id in ("ReFiT-ML1M-v0", "ReFiT-AmazonBook-v0", "ReFiT-Synthetic-v0"):
        assert load_env_spec(env_id).id == env_id
    assert load_env_spec("refit_gym:ReFiT-ML1M-v0").diffusion.steps == 40
    with pytest.raises(SpecError, match="unknown environment id 'Nope'.*ReFiT-ML1M-v0"):
        load_env_spec("Nope")


def test_pretrain_then_evaluate_synthetic(tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "run", tmp_path / "pretrain.json"
    assert main(["pretrain", "--env", "ReFiT-Synthetic-v0", "--seed", "2", "--out", str(out),
                 "--max-epochs", "6", "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert set(result["valid"]) == KEYS and set(result["test"]) == KEYS
    assert result["best_epoch"] in (5, 6) and result["epochs"] == 6
    assert json.loads((out / "metrics.json").read_text()) == result
    assert "recall@20" in capsys.readouterr().out
    evaluated = tmp_path / "eval.json"
    checkpoint = str(out / "denoiser.pt")
    assert main(["evaluate", "--env", "ReFiT-Synthetic-v0", "--checkpoint", checkpoint,
                 "--json", str(evaluated), "--quiet"]) == 0
    again = json.loads(evaluated.read_text())
    assert again["valid"] == pytest.approx(result["valid"], abs=1e-9)
    assert again["test"] == pytest.approx(result["test"], abs=1e-9)


def test_pretrain_is_reproducible(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        report = tmp_path / f"{name}.json"
        main(["pretrain", "--env", "ReFiT-Synthetic-v0", "--seed", "4", "--out",
              str(tmp_path / name), "--max-epochs", "5", "--json", str(report), "--quiet"])
        runs.append(json.loads(report.read_text()))
    assert runs[0]["history"] == runs[1]["history"]


def test_cli_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--env", "Nope-v0", "--checkpoint", "x.pt", "--quiet"]) == 2
    assert "unknown environment id" in capsys.readouterr().err
    assert main(["evaluate", "--env", "ReFiT-Synthetic-v0", "--checkpoint",
                 str(tmp_path / "missing.pt"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["pretrain", "--env", "ReFiT-ML1M-v0", "--data-dir", str(tmp_path),
                 "--quiet"]) == 2
    assert "REFIT_DATA_DIR" in capsys.readouterr().err


@pytest.mark.ml1m
def test_ml1m_pretrain_epoch_and_evaluate_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """The real path: DiffRec's ML-1M backbone, one epoch, evaluated twice the same way."""
    report = tmp_path / "ml1m.json"
    assert main(["pretrain", "--env", "ReFiT-ML1M-v0", "--data-dir", str(data_dir), "--out",
                 str(tmp_path), "--max-epochs", "1", "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    # One epoch of DiffRec on ML-1M already ranks far above popularity-free chance (~0.007).
    assert 0.05 < result["test"]["recall@20"] < 0.3
    evaluated = tmp_path / "eval.json"
    assert main(["evaluate", "--env", "ReFiT-ML1M-v0", "--data-dir", str(data_dir),
                 "--checkpoint", str(tmp_path / "denoiser.pt"), "--json", str(evaluated),
                 "--quiet"]) == 0
    assert json.loads(evaluated.read_text())["test"] == pytest.approx(result["test"], abs=1e-9)
    with pytest.raises(SystemExit):
        main(["evaluate", "--env", "ReFiT-ML1M-v0"])  # --checkpoint is required


def test_debug_mode_reraises_with_the_traceback(monkeypatch) -> None:
    monkeypatch.setenv("REFIT_DEBUG", "1")
    with pytest.raises(SpecError, match="unknown environment id"):
        main(["evaluate", "--env", "Nope-v0", "--checkpoint", "x.pt", "--quiet"])


def test_progress_is_one_plain_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "refit_gym.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stderr

    err = run("pretrain", "--env", "ReFiT-Synthetic-v0", "--max-epochs", "3", "--out", "pre")
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("pretrain ReFiT-Synthetic-v0")]
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == [
        "epoch 1", "epoch 2", "epoch 3"]
    err = run("finetune", "--env", "ReFiT-Synthetic-v0", "--algo", "continue", "--checkpoint",
              "pre/denoiser.pt", "--budget-seconds", "2", "--out", "cont")
    assert "\r" not in err and "continue ReFiT-Synthetic-v0: epoch" in err
    assert "/2 s" in err  # the continue bar counts seconds of its 2-second budget


SYN = "ReFiT-Synthetic-v0"


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--max-epochs", "0"], "argument --max-epochs: '0': must be a positive integer"),
    (["pretrain", "--max-epochs", "-2"], "argument --max-epochs: '-2': must be a positive"),
    (["pretrain", "--device", "gpu"], "argument --device: 'gpu' is not a torch device; use auto"),
    (["finetune", "--algo", "continue", "--checkpoint", "x.pt", "--budget-seconds", "0"],
     "argument --budget-seconds: '0': must be a positive number"),
    (["bench", "--seeds", "1,x"],
     "argument --seeds: '1,x' is not a comma-separated list of integer seeds, e.g. 1,2,3"),
    (["bench", "--pretrain-max-epochs", "0"], "argument --pretrain-max-epochs: '0': must be"),
])
def test_bad_flags_are_refused_in_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([argv[0], "--env", SYN, *argv[1:]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--algo", "refit", "--set", "kappa=abc"],
     "--set for refit: kappa = 'abc' (str); kappa takes float"),
    (["finetune", "--algo", "refit", "--set", "epochs=0"], "epochs = 0; epochs must be >= 1"),
    (["finetune", "--algo", "refit", "--set", "epochs=1.5"], "epochs = 1.5 (float); epochs takes"),
    (["finetune", "--algo", "refit", "--set", "group_size=1"], "group_size must be >= 2"),
    (["finetune", "--algo", "refit", "--set", "kapa=3"],
     "--set for refit: unknown keys ['kapa']; allowed: ['checkpoint_every', 'clip_range'"),
    (["finetune", "--algo", "continue", "--budget-seconds", "5", "--set", "lr=fast"],
     "--set for continue: lr = 'fast' (str); lr takes float"),
    (["finetune", "--algo", "ppo", "--set", "n_envs=0"], "n_envs = 0; n_envs must be >= 1"),
    (["finetune", "--algo", "ppo", "--env-kwargs", '{"steps": "5"}'],
     "--env-kwargs: ReFiT-Synthetic-v0 keyword: steps = '5' (str); steps takes int or None"),
    (["finetune", "--algo", "ppo", "--env-kwargs", '{"reward_params": {"k": 0}}'],
     "--env-kwargs: reward_params k = 0: the ranking cut-off must be an integer in [1, 400]"),
    (["finetune", "--algo", "ppo", "--env-kwargs", '["steps"]'],
     "--env-kwargs must be a JSON object"),
    (["bench", "--algos", "refit,ppo", "--set", "ppo.lr=3"],
     "--set ppo.KEY: unknown keys ['lr']; allowed: ['batch_size'"),
    (["bench", "--algos", "refit", "--set", "refit.kappa=abc"],
     "--set refit.KEY: kappa = 'abc' (str); kappa takes float"),
    (["bench", "--algos", "refit", "--env-kwargs", '{"steps": 0}'], "steps must be >= 1"),
])
def test_bad_settings_are_refused_before_any_work(argv: list[str], message: str,
                                                  tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = [argv[0], "--env", SYN, "--quiet", "--out", str(out), *argv[1:]]
    if argv[0] == "finetune":  # not there: the setting is refused before the checkpoint is read
        args += ["--checkpoint", str(tmp_path / "missing.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()  # nothing pretrained, nothing written


def test_bench_help_lists_the_algorithms_and_seeds(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    algos_help = shown.split("--algos ALGOS")[-1].split("--seeds SEEDS")[0]
    for name in ("pretrained", "refit", "continue", "ppo", "a2c", "trpo", "pop", "sasrec"):
        assert name in algos_help
    assert "comma-separated integer seeds" in shown.split("--seeds SEEDS")[-1]


@pytest.mark.parametrize("flag, expected", [([], False), (["--test-curve"], True)])
def test_finetune_test_curve_flag_reaches_the_driver(flag: list[str], expected: bool,
                                                     tmp_path: Path, monkeypatch) -> None:
    import sys

    # The package exports the function under the module's name: patch the module itself.
    driver = sys.modules["refit_gym.training.finetune"]
    seen: dict = {}

    def fake_finetune(*args, **kwargs) -> dict:  # records the call instead of training
        seen.update(kwargs)
        metrics = {"ndcg@20": 0.0}
        return {"best_epoch": 0, "wall_time_s": 0.0, "already_finished": False,
                "valid": metrics, "test": metrics, "start": {"valid": metrics, "test": metrics}}

    monkeypatch.setattr(driver, "finetune", fake_finetune)
    assert main(["finetune", "--env", SYN, "--algo", "refit", "--checkpoint",
                 str(tmp_path / "x.pt"), "--out", str(tmp_path / "out"), "--quiet", *flag]) == 0
    assert seen["test_curve"] is expected


def test_rerunning_a_finished_or_a_different_run_says_so_in_one_line(
        pretrained_synthetic: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "refit"
    argv = ["finetune", "--env", "ReFiT-Synthetic-v0", "--algo", "refit", "--checkpoint",
            str(pretrained_synthetic), "--out", str(out), "--quiet", "--set", "epochs=1",
            "--set", "users_per_epoch=32"]
    assert main(argv) == 0
    assert "s of training," in capsys.readouterr().out
    assert main(argv) == 0
    assert "already finished in an earlier run" in capsys.readouterr().out
    assert main([*argv[:-2], "--set", "users_per_epoch=64"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "config.users_per_epoch = 32, this run gives 64" in error[0]
