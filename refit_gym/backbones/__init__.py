"""The backbone layer: diffusion recommenders behind one interface (:class:`Backbone`).

DiffRec (collaborative filtering: the state is a user's interaction vector), DreamRec, ADRec and
the project's own ADRec-Concat (sequential: the state is the next item's embedding, conditioned
on the history), their checkpoints, and the registry that rebuilds any of them from a spec or
a checkpoint.
"""

from refit_gym.backbones.adrec import ADRec, ADRecConfig
from refit_gym.backbones.adrec_concat import ConcatADRec, ConcatADRecConfig
from refit_gym.backbones.base import Backbone, Batch
from refit_gym.backbones.checkpoint import (
    CheckpointError,
    backbone_configs,
    default_checkpoint,
    load_backbone,
    pretrain_hint,
    read_checkpoint,
    save_backbone,
)
from refit_gym.backbones.diffrec import DiffRec, DiffRecConfig, timestep_embedding
from refit_gym.backbones.dreamrec import DreamRec, DreamRecConfig, HistoryEncoder
from refit_gym.backbones.registry import BACKBONES, backbone_config, backbone_from_configs

__all__ = ["BACKBONES", "ADRec", "ADRecConfig", "Backbone", "Batch", "CheckpointError",
           "ConcatADRec", "ConcatADRecConfig",
           "DiffRec", "DiffRecConfig", "DreamRec", "DreamRecConfig", "HistoryEncoder",
           "backbone_config", "backbone_configs", "backbone_from_configs", "default_checkpoint",
           "load_backbone", "pretrain_hint", "read_checkpoint", "save_backbone",
           "timestep_embedding"]
