"""Does the ReFiT agent's policy gradient point where its reward rises? For a reward that is
differentiable in the final state (``neg_mse``, ``collaborative``), the exact gradient of the
mean reward over the policy's own chain is available by backpropagating through the sampled
chain (the pathwise gradient, here over ``--reference-group`` trajectories per episode). This
script compares it with the agent's score-function estimate of one batch (``group_size``
trajectories per episode, group-normalised advantages, the same code :meth:`ReFiTAgent.update`
steps along), by cosine, for several ``min_train_step`` values: the final steps, whose std
sigma_t is tiny, contribute terms eps / sigma_t that are almost pure noise.

    REFIT_DATA_DIR=../shared/data python benchmarks/gradient_check.py \\
        --env ReFiT-SeqSynthetic-v0 \\
        --checkpoint runs/ReFiT-SeqSynthetic-v0/pretrain-seed1/denoiser.pt
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import numpy as np
import torch
from common import write_result

from refit_gym.backbones import load_backbone
from refit_gym.mdp.gym_env import make_core
from refit_gym.rl import ReFiTAgent, ReFiTConfig
from refit_gym.specs import load_agent_hyperparams
from refit_gym.training.metrics import sample_std


def flat_gradient(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])


def pathwise_gradient(agent: ReFiTAgent, core, episodes: torch.Tensor, group: int,
                      seed: int) -> tuple[torch.Tensor, float]:
    """The gradient of the mean reward of ``group`` trajectories per episode of the policy
    (exploring on the steps the agent samples, the mean below ``min_train_step``), and that
    mean reward."""
    cfg, model = agent.config, agent.model
    generator = torch.Generator(core.device).manual_seed(seed)
    core.reset_rows(torch.arange(core.num_rows, device=core.device),
                    episodes.repeat_interleave(group), generator)
    batch, chain, x = core.backbone_batch(), core.chain, core.x
    condition = model.encode(batch)
    for step in reversed(range(chain.steps)):
        t = torch.full((len(x),), step, dtype=torch.long, device=x.device)
        mean = model.reverse_mean(x, t, condition, chain)
        if cfg.explores(step):  # the steps the agent samples; the mean chain elsewhere
            std = (cfg.kappa * model.reverse_std(t, chain)).to(mean.dtype).unsqueeze(-1)
            mean = mean + std * torch.randn(mean.shape, generator=generator,
                                            device=mean.device)
        x = mean
    reward = core.final_reward(x).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    agent.optimizer.zero_grad(set_to_none=True)
    (-reward).backward()  # the loss's gradient, as the agent's estimate is
    return flat_gradient(params), reward.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="ReFiT-SeqSynthetic-v0")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--env-kwargs", default='{"reward": "neg_mse", "reward_params": {}}')
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--reference-group", type=int, default=256)
    parser.add_argument("--draws", type=int, default=8, help="independent one-batch estimates")
    parser.add_argument("--min-train-steps", default="0,1,2,3,5,8")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_backbone(args.checkpoint)
    env_kwargs = {"checkpoint": args.checkpoint, **json.loads(args.env_kwargs)}
    base = ReFiTConfig(**load_agent_hyperparams("refit", args.env))
    episodes = None
    rows = []
    for min_step in [int(v) for v in args.min_train_steps.split(",")]:
        config = dataclasses.replace(base, min_train_step=min_step)
        agent = ReFiTAgent(copy.deepcopy(model), copy.deepcopy(model), config)
        _, _, core = make_core(args.env, args.episodes * args.reference_group, **env_kwargs)
        if episodes is None:
            episodes = torch.randperm(core.n_episodes, generator=torch.Generator().manual_seed(
                0))[:args.episodes]
        true, reward = pathwise_gradient(agent, core, episodes, args.reference_group, seed=0)
        _, _, batch_core = make_core(args.env, args.episodes * config.group_size, **env_kwargs)
        params = [p for p in agent.model.parameters() if p.requires_grad]
        cosines, norms = [], []
        for draw in range(args.draws):
            rollout = agent.rollout(batch_core, episodes,
                                    torch.Generator().manual_seed(1 + draw))
            agent.policy_gradient([rollout], len(episodes) * config.group_size)
            estimate = flat_gradient(params)
            cosines.append(torch.nn.functional.cosine_similarity(estimate, true, 0).item())
            norms.append(estimate.norm().item())
        rows.append(f"| {min_step} | {len(rollout.steps)} | {np.mean(cosines):.3f} ± "
                    f"{sample_std(cosines):.3f} | {np.mean(norms):.3g} | {true.norm().item():.3g} "
                    f"| {reward:.4f} |")
        print(rows[-1], flush=True)
    write_result(
        f"gradient_check_{args.env}_{env_kwargs.get('reward', 'default')}",
        f"The ReFiT agent's policy gradient against the exact gradient, {args.env}",
        [f"Checkpoint: {args.checkpoint}; MDP: {env_kwargs}; agent: agents/refit.toml's "
         f"{args.env} settings (kappa {base.kappa}, train_steps {base.train_steps}, group "
         f"{base.group_size}). {args.episodes} fixed training episodes. The exact gradient of "
         f"the mean reward: backpropagation through the policy's sampled chain, "
         f"{args.reference_group} trajectories per episode. The agent's estimate: one batch "
         f"(its group size per episode), {args.draws} independent draws (mean ± std).", "",
         "| min_train_step | trained steps | cosine(estimate, exact) | estimate norm | "
         "exact norm | mean reward |", "|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
