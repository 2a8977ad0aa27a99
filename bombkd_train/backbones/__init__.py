"""Frozen video backbones from a registry: ``create_backbone(name, frames=, size=, pool=, device=,
revision=)``; each records where its weights came from (``Backbone.record()``).

Names: the pretrained ``vjepa2``, ``videomae``, ``timesformer``, ``vivit`` (Hugging Face hub),
the tiny random built-ins ``tiny-*`` (tests, demo), any hub id ``org/name`` or a
``save_pretrained`` directory. The modules, in data-flow order:

    registry.py   names -> entry points; ``create_backbone`` resolves a name to a Backbone
    hf.py         ``Backbone``: a frozen Hugging Face video transformer, clips -> features
"""
from bombkd_train.backbones.hf import POOLS, Backbone
from bombkd_train.backbones.registry import (check_backbone_name, create_backbone,
                                              list_backbones, register_backbone)

__all__ = ["POOLS", "Backbone", "check_backbone_name", "create_backbone", "list_backbones",
           "register_backbone"]
