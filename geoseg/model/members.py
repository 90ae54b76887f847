"""Several networks of one architecture run as one model: the mean of their logits (a seed ensemble).

Networks trained from scratch on a small labelled area differ from seed to seed by more than most
recipe changes do; the mean of a few of them is steadier and better than a typical one. Every
member keeps its own weights (state-dict keys ``members.K.``); the class map is the argmax of the
mean logits.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


class MemberMean(nn.Module):
    """``mean(net(x) for net in members)``."""

    def __init__(self, nets: Iterable[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(nets)
        if len(self.members) == 0:
            raise ValueError("MemberMean needs at least one network")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(lambda net: net(x))

    def mean(self, run: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """The mean of ``run(member)`` over the members; accumulated in place where no gradient is
        recorded (inference: one output buffer more than one member needs)."""
        n = len(self.members)
        out = run(self.members[0])
        if torch.is_grad_enabled():
            for net in self.members[1:]:
                out = out + run(net)
            return out / n
        for net in self.members[1:]:
            out.add_(run(net))
        return out.div_(n)


def members_of(net: nn.Module) -> list[nn.Module]:
    """The networks a model runs: a MemberMean's members, else the network itself."""
    return list(net.members) if isinstance(net, MemberMean) else [net]
