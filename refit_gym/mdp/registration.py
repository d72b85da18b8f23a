"""Register spec ids with Gymnasium: the package's on ``import refit_gym``, a user's own with
:func:`register_spec`."""

from __future__ import annotations

import os
import warnings

import gymnasium as gym

from refit_gym.specs import EnvSpec, known_specs, register_spec_file


def hide_version_advice() -> None:
    """Silence Gymnasium's advice to "upgrade" a ReFiT v0 id to its v1: a ReFiT id's v1 is
    another backbone on the same data, not a newer release. Other ids keep the warning."""
    warnings.filterwarnings("ignore", message=r".*The environment ReFiT-\S+ is out of date",
                            category=DeprecationWarning)


hide_version_advice()  # on import, as registering the ids is


def register_spec(path: str | os.PathLike[str]) -> EnvSpec:
    """Register the id of a spec file anywhere (``gym.make(id)`` and every CLI command then
    know it), with data from the spec's ``[dataset] path`` or a ``data_dir``; returns the
    spec. A malformed file raises :class:`refit_gym.specs.SpecError` naming the key."""
    spec = register_spec_file(path)
    gym.registry.pop(spec.id, None)  # a re-read file replaces its id
    register_envs()
    return spec


def register_envs() -> None:
    for env_id in known_specs():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="refit_gym.mdp.gym_env:ReFiTEnv",
            vector_entry_point="refit_gym.mdp.gym_env:ReFiTVectorEnv",
            kwargs={"env_id": env_id},
        )
