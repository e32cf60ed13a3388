"""Losses: one file per method (pure function + thin registered module). See base.py for the contract.

Importing this package registers every built-in loss in ``LOSSES``:
supervised ``ce``; C2VKD ``pdd`` and ``vlfd``; baselines ``kd``, ``dkd``, ``cwd``, ``skd``, ``ifvd``,
``cirkd``, ``dist``, ``fitnet``, ``at``, ``ofa``, ``heteroakd``, ``hmkd`` and ``fskd`` (reconstructions), and the
adversarial (holistic) term ``adv`` that SKD / IFVD / CWD presets add."""
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs, masked_mean
from c2vkd.losses.ce import CELoss, ce_loss
from c2vkd.losses.pdd import PDD_PRESETS, PDDLoss, pdd_loss
from c2vkd.losses.vlfd import VLFDLoss, linguistic_loss, patch_graph_loss, vlfd_global_loss
from c2vkd.losses._common import resize_to
from c2vkd.losses.adapters import FeatureAdapter, make_adapter
from c2vkd.losses.adversarial import AdversarialLoss, Discriminator
from c2vkd.losses.at import ATLoss, at_loss
from c2vkd.losses.cirkd import CIRKDLoss, cirkd_memory_loss, cirkd_pixel_loss, cirkd_region_loss
from c2vkd.losses.cwd import CWDLoss, cwd_loss
from c2vkd.losses.dist import DISTLoss, dist_loss
from c2vkd.losses.dkd import DKDLoss, dkd_loss
from c2vkd.losses.fitnet import FitNetLoss, fitnet_loss
from c2vkd.losses.fskd import FSKDLoss, soft_rank, spearman_loss
from c2vkd.losses.hmkd import HMKDLoss, gla_loss, hfa_loss
from c2vkd.losses.heteroakd import HeteroAKDLoss, heteroakd_loss
from c2vkd.losses.ifvd import IFVDLoss, ifvd_loss
from c2vkd.losses.kd import KDLoss, kd_loss
from c2vkd.losses.ofa import OFABranch, OFALoss, ofa_loss
from c2vkd.losses.skd import SKDLoss, skd_loss

__all__ = [
    "LOSSES", "DistillLoss", "LossContext", "LossInputs", "masked_mean",
    "CELoss", "ce_loss",
    "PDD_PRESETS", "PDDLoss", "pdd_loss",
    "VLFDLoss", "linguistic_loss", "patch_graph_loss", "vlfd_global_loss",
    "FeatureAdapter", "make_adapter", "resize_to",
    "AdversarialLoss", "Discriminator", "ATLoss", "at_loss", "CIRKDLoss", "cirkd_memory_loss", "cirkd_pixel_loss", "cirkd_region_loss",
    "CWDLoss", "cwd_loss", "DISTLoss", "dist_loss", "DKDLoss", "dkd_loss", "FitNetLoss", "fitnet_loss",
    "FSKDLoss", "soft_rank", "spearman_loss",
    "HMKDLoss", "gla_loss", "hfa_loss",
    "HeteroAKDLoss", "heteroakd_loss",
    "IFVDLoss", "ifvd_loss", "KDLoss", "kd_loss", "OFABranch", "OFALoss", "ofa_loss", "SKDLoss", "skd_loss",
]
