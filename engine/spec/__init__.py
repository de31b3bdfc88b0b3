"""Speculative decoding: drafters (ABC + registry), the draft-length controller,
verification of drafts against the target's samples."""
from engine.spec.base import Drafter, create_drafter, register_drafter
from engine.spec.controller import DraftController
from engine.spec.latency import LatencyModel, LatencyTable
from engine.spec.verify import accept_drafts

__all__ = ["DraftController", "Drafter", "LatencyModel", "LatencyTable", "accept_drafts", "create_drafter",
           "register_drafter"]
