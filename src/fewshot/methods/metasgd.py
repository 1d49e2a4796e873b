"""Meta-SGD: MAML with a learned step size for every parameter element.

Li, Zhou, Chen & Li (2017), "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning". The inner update is theta' = theta - alpha * grad, where alpha has
the shape of theta and is meta-learned together with the initialisation
(both are ``Method.parameters()``, so one outer optimiser updates both).
Everything else (batch-norm modes, vmap and loop paths, first order) is MAML's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fewshot.methods.maml import MAML, _lr_key


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): per-element learned inner learning rates.

    ``inner_lr`` (a float) initialises every element of alpha. The same alpha
    is used at every inner step (the paper takes one step). Other arguments
    as for ``MAML``; ``per_step_lr`` is not available (alpha already is
    per-element).
    """

    name = "metasgd"

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, **kwargs: object) -> None:
        if kwargs.get("per_step_lr"):
            raise ValueError("MetaSGD learns per-element step sizes already; drop per_step_lr")
        if isinstance(inner_lr, Sequence | bool) or not isinstance(inner_lr, int | float):
            raise ValueError(f"MetaSGD's inner_lr initialises alpha and must be one float, got {inner_lr!r}")
        super().__init__(model, inner_lr=inner_lr, **kwargs)  # type: ignore[arg-type]

    def _setup_learning_rates(self) -> None:
        self.step_lrs = nn.ParameterDict()
        params = dict(self.model.named_parameters())
        for name in self._adapt_names():
            self.step_lrs[_lr_key(name)] = nn.Parameter(torch.full_like(params[name], self._fixed_lrs[0]))

    def _lr(self, lr_params: Mapping[str, torch.Tensor], step: int, name: str) -> torch.Tensor:
        return lr_params[_lr_key(name)]

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out["inner_lr"] = f"learned per element, initialised to {self._fixed_lrs[0]}"
        return out
