"""Method names to constructed methods: the one place that maps a config to a Method."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.config import GRADIENT_METHODS, Config
from fewshot.methods.base import Method
from fewshot.models.backbones import MLP, Classifier, Conv4, Pool
from fewshot.models.resnet import ResNet12

GRADIENT = GRADIENT_METHODS
METRIC = ("protonet", "matching", "relation")


CONV4_BACKBONES: dict[str, tuple[int, Pool]] = {
    "conv4": (64, "max"),
    "conv4-32": (32, "max"),
    "conv4-strided": (64, "stride"),  # Finn et al.'s Omniglot network
}
"""Conv-4 backbone names: (filters, how each stage halves the image)."""


def build_backbone(
    name: str, input_shape: tuple[int, ...], track_running_stats: bool = True
) -> tuple[nn.Module, int]:
    """A backbone and its feature size for inputs of ``input_shape``."""
    if name in CONV4_BACKBONES:
        hidden, pool = CONV4_BACKBONES[name]
        net = Conv4(input_shape[0], hidden=hidden, track_running_stats=track_running_stats, pool=pool)
        return net, net.out_features(input_shape)  # type: ignore[arg-type]
    if name == "resnet12":
        net = ResNet12(input_shape[0], track_running_stats=track_running_stats)
        return net, net.out_features(input_shape)  # type: ignore[arg-type]
    raise ValueError(f"backbone {name!r} cannot embed images; use {', '.join(CONV4_BACKBONES)} or resnet12")


def build_method(config: Config, input_shape: tuple[int, ...]) -> Method:
    """The method of ``config`` for inputs of ``input_shape`` ((C, H, W), or (1,) for sinusoids)."""
    if config.method.name in METRIC:
        # Channels-last convolution weights: oneDNN's convolutions then run channels-last,
        # about 1.4x faster for Conv-4 training on CPU (benchmarks/protonet_speed.py).
        # Not for gradient methods: vmap cannot query memory formats.
        return _metric_method(config, input_shape).to(memory_format=torch.channels_last)
    return _gradient_method(config, input_shape)


def _metric_method(config: Config, input_shape: tuple[int, ...]) -> Method:
    from fewshot.methods.matching import MatchingNetwork
    from fewshot.methods.protonet import PrototypicalNetwork
    from fewshot.methods.relation import RelationNetwork

    m = config.method
    if m.name == "relation":
        return RelationNetwork(image_shape=input_shape, loss=m.relation_loss)  # type: ignore[arg-type]
    backbone, features = build_backbone(m.backbone, input_shape)
    if m.name == "protonet":
        return PrototypicalNetwork(backbone, features, distance=m.distance, scale=m.scale)
    return MatchingNetwork(backbone, features, fce=m.fce, scale=1.0 if m.scale is None else m.scale)


def _gradient_method(config: Config, input_shape: tuple[int, ...]) -> Method:
    from fewshot.methods.maml import ANIL, MAML
    from fewshot.methods.metasgd import MetaSGD
    from fewshot.methods.reptile import Reptile

    m = config.method
    regression = config.task == "sinusoid"
    if regression:
        model: nn.Module = MLP()
    else:
        backbone, features = build_backbone(m.backbone, input_shape, track_running_stats=False)
        model = Classifier(backbone, features, config.train_episode.ways)
    common = dict(
        inner_lr=m.inner_lr,
        inner_steps=m.inner_steps,
        inner_steps_test=m.inner_steps_test,
        batchnorm=m.batchnorm,
        adapt_batchnorm=m.adapt_batchnorm,
        task="regression" if regression else "classification",
    )
    if m.name == "anil":
        return ANIL(model, first_order=m.first_order, per_step_lr=m.per_step_lr, **common)
    if m.name in ("maml", "fomaml"):
        first_order = m.first_order or m.name == "fomaml"
        return MAML(model, first_order=first_order, per_step_lr=m.per_step_lr, **common)
    if m.name == "metasgd":
        return MetaSGD(model, first_order=m.first_order, **common)
    return Reptile(
        model,
        inner_batch=m.inner_batch,
        inner_optimizer=m.inner_optimizer,
        inner_batch_test=m.inner_batch_test,
        **common,
    )
