"""PPO, A2C and TRPO (Stable-Baselines3 / sb3-contrib) as plug-ins of the driver: an epoch is
SB3's own ``learn`` over one epoch's episodes; the policy is the SB3 actor's backbone.

SB3 keeps its optimiser and settings in its own ``.zip``, which SB3 loads with cloudpickle, so
loading a zip can execute code: the run state records the zip's sha256 when it is written and a
resumed run refuses a zip that does not match it."""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.logger import Logger

from refit_gym.backbones import CheckpointError
from refit_gym.data import atomic_path, sha256_of
from refit_gym.distributed import current
from refit_gym.rl.algorithm import EpochContext, EpochStats, Extent
from refit_gym.rl.sb3_agents import (
    SB3_ALGOS,
    EpisodeRewards,
    episodes_per_epoch,
    make_model,
    make_vec_env,
    split_hyperparams,
)
from refit_gym.training.algorithms.base import Setup


class SB3Algorithm:
    """One of :data:`~refit_gym.rl.sb3_agents.SB3_ALGOS` (``name``) with the pretrained
    diffusion actor; driver keys as :mod:`refit_gym.rl.sb3_agents` describes."""

    def __init__(self, name: str, setup: Setup) -> None:
        setup.refuse_budget(name)
        if current().active:
            raise ValueError(f"{name} runs in one process only (Stable-Baselines3 has no "
                             "distributed training); start it without torchrun, or use --algo "
                             "refit or continue")
        self.name = name
        driver, self.sb3_args = split_hyperparams(setup.params)
        self.driver = {"epochs": 1, "users_per_epoch": 0, "n_envs": 16, "group_size": 1,
                       **driver}
        self.config: dict[str, Any] = {**self.driver, **self.sb3_args}
        self.device, self.zip_path = setup.device, setup.out_dir / f"{name}.zip"
        self.venv = make_vec_env(setup.spec, setup.settings, setup.data, self.driver["n_envs"],
                                 self.driver["group_size"], setup.seed)
        self.model = make_model(name, self.venv, setup.model, self.sb3_args, setup.seed,
                                setup.device)
        self._quiet()
        self.episodes = episodes_per_epoch(self.driver, setup.source.n_episodes)
        self.steps = setup.source.chain.steps
        self.callback = EpisodeRewards()
        self.epochs = 0

    def _quiet(self) -> None:
        # Metrics go to the run's TensorBoard; without a logger of its own, every `learn` would
        # leave an empty SB3-<date> folder in the system's temporary directory.
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.policy = self.model.policy.backbone  # the actor: evaluated and saved like any

    def progress(self, epochs: int, seconds: float) -> Extent:
        return Extent(epochs, self.driver["epochs"], "epoch")

    def run_epoch(self, ctx: EpochContext) -> EpochStats:
        self.model.learn(self.episodes * self.steps, callback=self.callback,
                         reset_num_timesteps=False)
        rewards, self.callback.rewards = self.callback.rewards, []
        self.epochs += 1
        # SB3's own values of the epoch's last update ("train/loss", "train/approx_kl", ...),
        # by epoch like the driver's validation curves.
        for key, value in self.model.logger.name_to_value.items():
            ctx.log(key, value, self.epochs)
        return EpochStats(rewards=rewards)

    def state_dict(self) -> dict[str, Any]:
        """Writes the SB3 .zip (rank 0: SB3 runs in one process) and names it by digest."""
        with atomic_path(self.zip_path) as tmp:
            self.model.save(tmp.with_suffix(".zip"))
            tmp.with_suffix(".zip").replace(tmp)
        return {"epochs": self.epochs, "zip": self.zip_path.name,
                "zip_sha256": sha256_of(self.zip_path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        path = self.zip_path.with_name(state["zip"])
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the run state in {path.parent} needs "
                                  "the SB3 model it was saved with; delete the folder to start "
                                  "over")
        digest = sha256_of(path)
        if digest != state["zip_sha256"]:
            raise CheckpointError(
                f"{path} is not the SB3 model this run wrote (sha256 {digest[:12]}..., the run "
                f"state records {state['zip_sha256'][:12]}...); it was changed after it was "
                "written and is not loaded (SB3 unpickles it, which can run code). Delete the "
                "folder to start the run over")
        self.model = SB3_ALGOS[self.name].load(path, env=self.venv, device=self.device)
        self._quiet()
        self.epochs = state["epochs"]

