"""Stable-Baselines3 policy whose actor is the pretrained diffusion backbone.

The action distribution is the reverse-diffusion Gaussian N(mu_theta(x_t, t), (kappa sigma_t)^2 I):
mu_theta is the backbone's reverse-step mean (the posterior mean of its x0 prediction), sigma_t
the fixed posterior std. The critic is a small value head on (x_t, one-hot t). PPO, A2C and
TRPO use it unchanged through :class:`refit_gym.mdp.sb3_vec_env.ReFiTVecEnv`.

Log-probability reduction (explicit, because it decides whether ratios are usable): SB3 sums a
diagonal Gaussian's log-density over dimensions. Here that sum is taken exactly, in float64
(``gaussian_log_prob``), then returned as float32 because SB3's rollout buffer stores float32.
With sigma ~ 1e-3 over 2,810 items the log-density is ~ +1.3e4, where float32 resolves ~1e-3:
ratios exp(new - old) carry ~0.1% error, small beside PPO's 0.2 clip range. With kappa = 1 a
parameter update that moves the mean by 1e-4 per item already changes the log-density by
~ 1e2 (ratio overflow), which is why kappa (exploration scale) defaults to 10 and learning
rates are small.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import Tensor, nn

from refit_gym.backbones import Backbone, backbone_from_configs
from refit_gym.diffusion import GaussianDiffusion, gaussian_log_prob


class DiffusionGaussian(Distribution):
    """N(mean, diag(std^2)) with an exact float64 log-density summed over items."""

    def __init__(self) -> None:
        super().__init__()
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def proba_distribution_net(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError("the mean comes from the denoiser, not a new layer")

    def proba_distribution(self, mean: Tensor, std: Tensor) -> DiffusionGaussian:
        """mean (B, n) float32; std (B,) float64, one value per row (per timestep)."""
        self.mean, self.std = mean, std
        self.distribution = torch.distributions.Normal(
            mean, std.to(mean.dtype).unsqueeze(-1).expand_as(mean))
        return self

    def log_prob(self, actions: Tensor) -> Tensor:
        return gaussian_log_prob(actions, self.mean, self.std).float()

    def entropy(self) -> Tensor:
        """Constant in theta (the std is fixed): sum over items of 0.5 log(2 pi e std^2)."""
        n = self.mean.shape[-1]
        return (n * (0.5 * np.log(2 * np.pi * np.e) + self.std.log())).float()

    def sample(self) -> Tensor:
        noise = torch.randn_like(self.mean)
        return self.mean + self.std.to(self.mean.dtype).unsqueeze(-1) * noise

    def mode(self) -> Tensor:
        return self.mean

    def actions_from_params(self, mean: Tensor, std: Tensor,
                            deterministic: bool = False) -> Tensor:
        return self.proba_distribution(mean, std).get_actions(deterministic=deterministic)

    def log_prob_from_params(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        actions = self.actions_from_params(mean, std)
        return actions, self.log_prob(actions)


class DiffusionActorCriticPolicy(ActorCriticPolicy):
    """Actor: the backbone (load pretrained weights into ``.backbone``), stepping the
    environment's K-step chain (``chain_steps``; None: all T; stopping at network timestep
    ``stop_step``, as the environment's); critic: a small MLP on
    [x_t, one-hot t, the condition c (detached)]. Observation ``{"x": (d,), "t":
    Discrete(K + 1)}``, plus ``"history"`` (item ids) for a conditional backbone.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Any,
        backbone_configs: dict[str, Any] | None = None,
        chain_steps: int | None = None,
        stop_step: int = 0,
        kappa: float = 10.0,
        value_hidden: int = 64,
        **kwargs: Any,
    ) -> None:
        if backbone_configs is None:
            raise ValueError("DiffusionActorCriticPolicy needs policy_kwargs backbone_configs "
                             "(see refit_gym.rl.sb3_agents.make_model)")
        # Dropout off: SB3 switches the policy to train mode before updates, and the rollout's
        # and the update's log-probabilities must score the same policy.
        self.backbone_configs = {**backbone_configs,
                                 "config": {**backbone_configs["config"], "dropout": 0.0}}
        self.chain_steps, self.kappa, self.value_hidden = chain_steps, kappa, value_hidden
        self.stop_step = stop_step
        self._extra = {"backbone_configs": backbone_configs, "chain_steps": chain_steps,
                       "kappa": kappa, "value_hidden": value_hidden,
                       **({"stop_step": stop_step} if stop_step else {})}
        self._chain: GaussianDiffusion | None = None
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def set_training_mode(self, mode: bool) -> None:
        """SB3 turns training mode on for its update and off for its rollouts; the backbone
        stays in eval mode in both. Its dropout regularises pretraining; in the update it would
        make the log-probabilities of the rollout's own actions another draw than the rollout
        sampled them with, so every importance ratio is noise (PPO's approximate KL on ADRec:
        about 40 at the first minibatch, which made ``target_kl`` stop every update before its
        first step), as the agents' own update keeps it in eval mode."""
        super().set_training_mode(mode)
        self.backbone.eval()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), **self._extra}

    def _build(self, lr_schedule: Any) -> None:
        self.backbone: Backbone = backbone_from_configs(self.backbone_configs)
        self.backbone.freeze_for_finetuning()
        steps = self.chain_steps or self.backbone.diffusion.steps
        width = self.backbone.state_dim + steps + 1 + self.backbone.value_feature_dim
        # "value" in the names: TRPO leaves such parameters out of its KL Hessian.
        self.value_net = nn.Sequential(nn.Linear(width, self.value_hidden), nn.Tanh(),
                                       nn.Linear(self.value_hidden, 1))
        self.action_dist = DiffusionGaussian()
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1),
                                              **self.optimizer_kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters only: a frozen one (DreamRec's E, which defines the
        environment's reward) is not the policy's to move, and sb3-contrib's TRPO
        differentiates with respect to every parameter it is given."""
        for name, parameter in super().named_parameters(prefix, recurse, remove_duplicate):
            if parameter.requires_grad:
                yield name, parameter

    @property
    def chain(self) -> GaussianDiffusion:
        """The environment's chain, on the backbone's device (rebuilt after a move)."""
        if self._chain is None or self._chain.device != self.backbone.diffusion.device:
            self._chain = self.backbone.diffusion.respaced(
                self.chain_steps or self.backbone.diffusion.config.steps, self.stop_step)
        return self._chain

    def _unpack(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x (B, d), one-hot t (B, K+1), the chain step t - 1 (B,), and the condition."""
        pre = preprocess_obs({k: obs[k] for k in ("x", "t")},
                             spaces.Dict({k: self.observation_space[k] for k in ("x", "t")}),
                             normalize_images=False)
        x = pre["x"].float()
        t_onehot = pre["t"].float().reshape(len(x), -1)  # the buffer stores t as (B, 1)
        t_index = (t_onehot.argmax(-1) - 1).clamp(min=0)
        # The history enters as item ids (SB3 would one-hot a MultiDiscrete): read it raw.
        batch = {"history": obs["history"].long()} if "history" in obs else {}
        return x, t_onehot, t_index, self.backbone.encode(batch)

    def _distribution(self, x: Tensor, t_index: Tensor,
                      condition: Tensor | None) -> DiffusionGaussian:
        mean = self.backbone.reverse_mean(x, t_index, condition, self.chain)
        if not bool(torch.isfinite(mean.sum())):
            raise FloatingPointError(
                "the diffusion policy's mean is not finite: the actor diverged. Ratios "
                "exp(log pi - log pi_old) over thousands of items overflow when one update moves "
                "the policy too far; lower learning_rate or set target_kl (PPO checks it before "
                "each gradient step).")
        std = self.kappa * self.backbone.reverse_std(t_index, self.chain)
        return self.action_dist.proba_distribution(mean, std)

    def _value(self, x: Tensor, t_onehot: Tensor, condition: Tensor | None) -> Tensor:
        features = self.backbone.value_features(condition)
        parts = [x, t_onehot] if features is None else [x, t_onehot, features.detach()]
        return self.value_net(torch.cat(parts, dim=-1))

    def forward(self, obs: dict[str, Tensor], deterministic: bool = False):
        x, t_onehot, t_index, condition = self._unpack(obs)
        distribution = self._distribution(x, t_index, condition)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, self._value(x, t_onehot, condition), distribution.log_prob(actions)

    def evaluate_actions(self, obs: dict[str, Tensor], actions: Tensor):
        x, t_onehot, t_index, condition = self._unpack(obs)
        distribution = self._distribution(x, t_index, condition)
        return (self._value(x, t_onehot, condition), distribution.log_prob(actions),
                distribution.entropy())

    def get_distribution(self, obs: dict[str, Tensor]) -> DiffusionGaussian:
        x, _, t_index, condition = self._unpack(obs)
        return self._distribution(x, t_index, condition)

    def predict_values(self, obs: dict[str, Tensor]) -> Tensor:
        x, t_onehot, _, condition = self._unpack(obs)
        return self._value(x, t_onehot, condition)

    def _predict(self, observation: dict[str, Tensor], deterministic: bool = False) -> Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)
