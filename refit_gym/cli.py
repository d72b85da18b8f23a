"""The ``refit-gym`` command line: pretrain, evaluate, finetune, bench, download.

``pretrain``, ``evaluate`` and ``finetune`` (ReFiT and ``continue``) also run data-parallel under
``torchrun --nproc_per_node N -m refit_gym.cli ...``; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from refit_gym.backbones import CheckpointError, default_checkpoint
from refit_gym.data import DataError, Dataset, load_dataset, write_json
from refit_gym.distributed import (
    DistributedError,
    current,
    init_from_environment,
    launched_by_torchrun,
    shutdown,
)
from refit_gym.mdp.gym_env import EnvSettings
from refit_gym.mdp.registration import register_spec
from refit_gym.specs import (
    EnvSpec,
    SpecError,
    check_agent_hyperparams,
    check_device,
    known_specs,
    load_env_spec,
)
from refit_gym.training.finetune import ALGOS
from refit_gym.training.metrics import evaluate, format_metrics_table
from refit_gym.training.peers import PEER_NAMES


class _Parser(argparse.ArgumentParser):
    """argparse with each error on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` above 0 (and finite)."""
    noun = "integer" if kind is int else "number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an {noun}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a positive {noun}")
        return value

    return parse


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integer "
                                         "seeds, e.g. 1,2,3") from None


def _device(text: str) -> str:
    try:
        return check_device(text, None)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _env_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default=None, metavar="ID",
                        help=f"environment id: {', '.join(sorted(known_specs()))}")
    parser.add_argument("--spec", default=None, metavar="PATH",
                        help="a spec file of your own (registers its id; --env defaults to it)")


def _seed_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=1,
                        help="seeds every random draw of the run (default 1)")


def _common(parser: argparse.ArgumentParser) -> None:
    _env_options(parser)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the datasets (default: $REFIT_DATA_DIR, else "
                        "~/.cache/refit-gym)")
    parser.add_argument("--device", default="auto", type=_device,
                        help="torch device: auto (CUDA when available, else CPU), cpu, cuda, "
                        "cuda:N")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the results as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _spec(args: argparse.Namespace) -> EnvSpec:
    """The spec that ``--spec`` registers or ``--env`` names."""
    if args.spec:
        registered = register_spec(args.spec)
        args.env = args.env or registered.id
    if not args.env:
        raise SpecError("name an environment: --env ID, or --spec PATH for a spec of your own; "
                        f"known ids: {sorted(known_specs())}")
    return load_env_spec(args.env)


def _load(args: argparse.Namespace):
    _, args.device = init_from_environment(args.device)
    spec = _spec(args)
    data = load_dataset(spec.dataset, args.data_dir)
    if not args.quiet and current().is_main:
        print(data.summary(), file=sys.stderr)
    return spec, data


def _report(title: str, payload: dict, json_path: str | None) -> None:
    if not current().is_main:
        return
    print(title)
    print(format_metrics_table({"valid": payload["valid"], "test": payload["test"]}))
    if json_path:
        write_json(json_path, payload)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from refit_gym.training.bench import pretrain_identity, record_cell
    from refit_gym.training.pretrain import pretrain

    spec, data = _load(args)
    out = Path(args.out) if args.out else default_checkpoint(spec.id, args.seed).parent
    result = pretrain(spec, data, out, seed=args.seed, device=args.device,
                      max_epochs=args.max_epochs, progress=not args.quiet)
    payload = record_cell(out, result.to_json(spec.id, args.seed),
                          pretrain_identity(spec, data, args.seed, args.max_epochs, args.device),
                          args.device)
    _report(
        f"{spec.id} pretrain seed {args.seed}: best epoch {result.best_epoch} of "
        f"{result.epochs}, {result.wall_time_s:.0f} s, checkpoint {result.checkpoint}",
        payload, args.json,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    spec, data = _load(args)
    backbone, _ = spec.load_backbone(args.checkpoint, data.n_items, args.device)
    metrics = evaluate(backbone, data, spec.pretrain, device=args.device,
                       progress=not args.quiet and current().is_main)
    payload = {"env": spec.id, "checkpoint": str(args.checkpoint), **metrics}
    _report(f"{spec.id} evaluate {args.checkpoint}", payload, args.json)


def parse_sets(pairs: list[str]) -> dict[str, object]:
    """``key=value`` strings -> a dict; values are read as JSON when they parse (numbers...)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SpecError(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _env_kwargs(args: argparse.Namespace, spec: EnvSpec, data: Dataset) -> dict[str, object]:
    """``--env-kwargs``, refused now (not after pretraining) if ``gym.make`` would refuse it."""
    try:
        kwargs = json.loads(args.env_kwargs) if args.env_kwargs else {}
    except json.JSONDecodeError as err:
        raise SpecError(f"--env-kwargs is not valid JSON: {err}") from err
    if not isinstance(kwargs, dict):
        raise SpecError(f"--env-kwargs must be a JSON object of gym.make keywords, got "
                        f"{args.env_kwargs!r}")
    try:
        EnvSettings.resolve(spec, {"device": args.device, **kwargs}).check_reward_params(data)
    except (TypeError, ValueError) as err:
        raise SpecError(f"--env-kwargs: {err}") from None
    return kwargs


def _run_options(parser: argparse.ArgumentParser, set_help: str) -> None:
    """Options shared by finetune and bench: hyperparameter overrides and MDP overrides."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--env-kwargs", default=None, metavar="JSON",
                        help='MDP overrides as for gym.make, e.g. \'{"reward": "ndcg"}\'')


def _checkpoint(args: argparse.Namespace, spec: EnvSpec) -> Path:
    """``--checkpoint``, else what ``refit-gym pretrain --env ID --seed S`` writes by default."""
    if args.checkpoint is not None:
        return Path(args.checkpoint)
    path = default_checkpoint(spec.id, args.seed)
    if not path.is_file():
        raise CheckpointError(
            f"no --checkpoint given and none at the default {path} under the current directory "
            f"(where `refit-gym pretrain --env {spec.id} --seed {args.seed}` writes): run that "
            "first, or pass --checkpoint PATH")
    return path


def cmd_finetune(args: argparse.Namespace) -> None:
    from refit_gym.training.finetune import finetune

    hyperparams = parse_sets(args.set)
    check_agent_hyperparams(args.algo, hyperparams, f"--set for {args.algo}")
    checkpoint = _checkpoint(args, _spec(args))  # before the data are read
    spec, data = _load(args)
    env_kwargs = _env_kwargs(args, spec, data)
    out = Path(args.out or f"runs/{spec.id}/{args.algo}-seed{args.seed}")
    payload = finetune(spec, data, checkpoint, args.algo, out, seed=args.seed,
                       device=args.device, hyperparams=hyperparams,
                       env_kwargs=env_kwargs, budget_seconds=args.budget_seconds,
                       progress=not args.quiet, test_curve=args.test_curve)
    if not current().is_main:
        return
    ran = (f"already finished in an earlier run ({payload['wall_time_s']:.0f} s of training "
           "then; nothing trained now)" if payload["already_finished"] else
           f"{payload['wall_time_s']:.0f} s of training")
    print(f"{spec.id} finetune {args.algo} seed {args.seed}: selected epoch "
          f"{payload['best_epoch']} (0 = the pretrained start), {ran}, checkpoint "
          f"{out / 'finetuned.pt'}")
    print(format_metrics_table({"start valid": payload["start"]["valid"],
                                "start test": payload["start"]["test"],
                                "valid": payload["valid"], "test": payload["test"]}))
    if args.json:
        write_json(args.json, payload)


def cmd_bench(args: argparse.Namespace) -> None:
    from refit_gym.training.bench import run_bench

    hyperparams: dict[str, dict] = {}
    for algo_key, value in parse_sets(args.set).items():
        algo, dot, key = algo_key.partition(".")
        if not dot:
            raise SpecError(f"bench --set expects ALGO.KEY=VALUE, got {algo_key!r}")
        hyperparams.setdefault(algo, {})[key] = value
    for algo, params in hyperparams.items():  # before any pretraining starts
        check_agent_hyperparams(algo, params, f"--set {algo}.KEY")
    spec, data = _load(args)
    env_kwargs = _env_kwargs(args, spec, data)
    out = Path(args.out or f"runs/{spec.id}/bench")
    payload = run_bench(spec, data, args.algos.split(","), args.seeds, out, device=args.device,
                        hyperparams=hyperparams, env_kwargs=env_kwargs,
                        pretrain_max_epochs=args.pretrain_max_epochs, progress=not args.quiet)
    print((out / "results.md").read_text())
    print(f"written: {out}/results.md, results.json, learning_curves.png, metrics.png")
    if args.json:
        write_json(args.json, payload["summary"])


def cmd_download(args: argparse.Namespace) -> None:
    from refit_gym.data.download import fetch_dataset

    spec = _spec(args)
    directory = fetch_dataset(spec.dataset, args.data_dir, progress=not args.quiet)
    print(f"{spec.dataset['name']}: verified files in {directory}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refit-gym", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the id's backbone with its own protocol")
    _common(p)
    _seed_option(p)
    p.add_argument("--out", default=None,
                   help="output folder (default runs/<env>/pretrain-seed<S>)")
    p.add_argument("--max-epochs", type=_positive(int), default=None,
                   help="cap on epochs (default: the spec's; early stopping still applies)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="validation and test metrics of a checkpoint")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="a .pt written by pretrain or finetune")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="fine-tune a pretrained backbone (resumable)")
    _common(p)
    p.add_argument("--algo", required=True, choices=ALGOS,
                   help="the agent (its settings per id: agents/<algo>.toml); continue trains "
                   "the backbone further with its own loss for --budget-seconds")
    p.add_argument("--checkpoint", default=None,
                   help="the pretrained denoiser.pt (default: runs/<env>/pretrain-seed<S>/"
                   "denoiser.pt, what pretrain writes for --seed S)")
    _seed_option(p)
    p.add_argument("--out", default=None, help="output folder (default runs/<env>/<algo>-seed<S>)")
    _run_options(p, "override a hyperparameter of agents/<algo>.toml (repeatable)")
    p.add_argument("--budget-seconds", type=_positive(float), default=None,
                   help="training wall time of --algo continue (match the RL run's)")
    p.add_argument("--test-curve", action="store_true",
                   help="evaluate test on every selection pass too (a learning curve in "
                        "history); by default only the start and the selected model")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("bench", help="compare algorithms over seeds: table, JSON, plots")
    _common(p)
    p.add_argument("--algos", default="pretrained,continue,refit,ppo,a2c,trpo",
                   help="comma-separated, of: pretrained (the backbone as pretrained), stop (the "
                   "same, its chain stopped at the step chosen on validation; sequential ids), "
                   f"{', '.join(ALGOS)} (fine-tuning; continue needs refit, whose wall time it "
                   f"gets), {', '.join(PEER_NAMES)} (baselines tuned on validation); "
                   "default %(default)s")
    p.add_argument("--seeds", default="1,2,3", type=_seeds,
                   help="comma-separated integer seeds; each pretrains its own backbone and "
                   "runs every algorithm on it (default %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default runs/<env>/bench)")
    _run_options(p, "ALGO.KEY=VALUE: override a hyperparameter of one algorithm (repeatable)")
    p.add_argument("--pretrain-max-epochs", type=_positive(int), default=None,
                   help="cap on pretraining epochs (default: the spec's)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("download", help="fetch a dataset with pinned checksums")
    _env_options(p)
    p.add_argument("--data-dir", default=None,
                   help="folder the dataset goes to (default: $REFIT_DATA_DIR, else "
                   "~/.cache/refit-gym)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)
    return parser


DISTRIBUTED_COMMANDS = ("pretrain", "evaluate", "finetune")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if launched_by_torchrun() and args.command not in DISTRIBUTED_COMMANDS:
            raise ValueError(f"refit-gym {args.command} runs in one process; start it without "
                             f"torchrun (torchrun runs: {', '.join(DISTRIBUTED_COMMANDS)})")
        args.func(args)
    except (DataError, SpecError, CheckpointError, DistributedError, TypeError, ValueError,
            FloatingPointError) as err:
        if os.environ.get("REFIT_DEBUG"):
            raise
        print(f"refit-gym: error: {err} ({type(err).__name__}; REFIT_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
