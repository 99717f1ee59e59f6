"""The one rule every sparse module applies first: its dimensionality matches the map's."""
from __future__ import annotations

from torch import nn

from ..tensor import SparseTensor

_KIND = {2: "2-D images", 3: "3-D volumes"}


def check_map_dims(module: nn.Module, x: SparseTensor, ndim: int) -> None:
    """Refuse a sparse map with other than ``ndim`` spatial axes (a Conv2d given volumes) in one line."""
    if x.ndim == ndim:
        return
    name = type(module).__name__
    twin = name.replace(f"{ndim}d", f"{x.ndim}d")
    hint = f"; use {twin}" if twin != name else ""
    raise ValueError(f"{name} takes sparse maps of {_KIND.get(ndim, f'{ndim}-D grids')}, got one of "
                     f"{_KIND.get(x.ndim, f'{x.ndim}-D grids')} (dense shape {x.dense_shape}){hint}")
