"""PyTorch adapter: a module's parameters as one flat vector.

:class:`FlatModule` rebinds every parameter of a module as a view into one contiguous float32
buffer. Reading the model as a flat vector is then a single copy, and loading a flat vector is
a single ``copy_`` -- no per-layer Python loop on the hot path, and the buffer can be shared
with numpy without copying.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shoal.errors import SpecError
from shoal.params import ParamSpec

__all__ = ["FlatModule", "spec_of"]


def spec_of(module: nn.Module) -> ParamSpec:
    """The :class:`ParamSpec` of a module's trainable parameters, in registration order."""
    shapes = [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    if not shapes:
        raise SpecError(f"{type(module).__name__} has no parameters")
    return ParamSpec.from_shapes(shapes)


class FlatModule:
    """A module whose parameters live in one flat float32 buffer.

    Args:
        module: the model; its parameters are converted to float32 and rebound as views into
            :attr:`flat`. Buffers (e.g. batch-norm statistics) are not part of the vector:
            shoal aggregates parameters only, and models with buffers train with the
            sequential engine.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.spec = spec_of(module)
        with torch.no_grad():
            flat = torch.empty(self.spec.size, dtype=torch.float32)
            for t, (_, p) in zip(self.spec.tensors, module.named_parameters()):
                flat[t.offset:t.stop].copy_(p.detach().reshape(-1))
            for t, (_, p) in zip(self.spec.tensors, module.named_parameters()):
                p.data = flat[t.offset:t.stop].view(t.shape)
        self.flat = flat

    def get(self) -> np.ndarray:
        """A copy of the parameters as a float32 numpy vector."""
        return self.flat.detach().numpy().copy()

    def view(self) -> np.ndarray:
        """The live parameter buffer as numpy (no copy; writing it changes the model)."""
        return self.flat.detach().numpy()

    def set(self, vec: np.ndarray) -> None:
        """Load a flat vector into the module (one copy).

        Raises:
            SpecError: ``vec`` does not have the module's length.
        """
        self.spec.check_vector(vec, "parameter vector")
        # Assign through numpy: ``vec`` may be a read-only view (a ServerState's params).
        self.flat.detach().numpy()[:] = vec

    def named_views(self) -> dict[str, torch.Tensor]:
        """Each parameter as a view into the flat buffer, by name."""
        return {t.name: self.flat[t.offset:t.stop].view(t.shape) for t in self.spec.tensors}
