"""A timm model as a recipe's model: ``{name: timm, arch: resnet18, ...}`` (timm installed).

``timm.create_model(arch, pretrained=False, num_classes=<the data's>, in_chans=<the data's>, **args)``:
random-init by name, or with ``checkpoint:`` a local safetensors file of weights (timm's own, or one
distillery wrote), verified against its checksum record unless ``verify: false``. Pretrained weights
are never downloaded. ``head: new`` keeps a fresh classifier when the checkpoint's was trained for
another class count (timm's ``default_cfg["classifier"]`` names it).

timm imports torchvision; where torchvision does not import beside the installed torch, the recipe
gets a one-line error saying so.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import DistilleryError
from . import MODELS


def _timm():
    try:
        import timm
    except ImportError as e:
        raise DistilleryError(f"model timm: timm does not import here ({e}); pip install timm (it needs a "
                              "torchvision built for this torch), or use another model.") from None
    return timm


@MODELS.register("timm")
def timm_model(input_shape: tuple[int, ...], num_classes: int, arch: str = "", checkpoint: str | None = None,
               verify: bool = True, head: str = "keep", args: dict | None = None) -> nn.Module:
    timm = _timm()
    if not arch:
        raise DistilleryError("model timm: give arch: a timm model name, e.g. resnet18 (timm.list_models()).")
    if head not in ("keep", "new"):
        raise DistilleryError(f"model timm: head must be keep or new, got {head!r}.")
    if arch not in timm.list_models():
        from ..errors import close_matches

        near = close_matches(arch, timm.list_models())
        raise DistilleryError(f"model timm: {arch!r} is not a timm model" + (f"; did you mean {near[0]!r}?" if near
                                                                               else " (timm.list_models())."))
    chans = {"in_chans": int(input_shape[0])} if len(input_shape) == 3 else {}
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **chans, **(args or {}))
    if checkpoint is not None:
        _load(model, Path(checkpoint), verify, head)
    return model


def _load(model: nn.Module, path: Path, verify: bool, head: str) -> None:
    """Weights from a local safetensors file; ``head: new`` leaves the classifier out when its shape differs."""
    from ..pipeline import load_weights, read_weights

    if head == "keep":
        try:
            load_weights(model, path, verify=verify)
        except DistilleryError as e:
            if "do not fit" not in str(e):
                raise
            raise DistilleryError(f"{e} (a checkpoint of another class count: head: new keeps its body and a fresh "
                                  "classifier)") from None
        return
    tensors, _ = read_weights(path, verify=verify)
    names = (getattr(model, "default_cfg", None) or {}).get("classifier", "")
    heads = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))  # DeiT: (head, head_dist)
    own = model.state_dict()
    kept = {k: v for k, v in tensors.items() if not (k.startswith(heads) and own.get(k, v).shape != v.shape)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(heads) for k in missing):
        raise DistilleryError(f"model timm: {path} does not fit {type(model).__name__} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
