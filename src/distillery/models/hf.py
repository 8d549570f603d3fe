"""A Hugging Face model folder as a recipe's model: ``{name: hf, path: FOLDER, task: ...}``.

Any architecture transformers knows, from a local folder (``config.json`` and safetensors weights;
pickled ``.bin`` weights are refused, nothing is downloaded). ``task`` picks the head:
``sequence-classification`` (the default; the head is sized to the data set's classes),
``image-classification``, ``causal-lm`` or ``feature-extraction``. ``layers: [i, j, ...]`` builds a
smaller model of the same family from the folder: the embeddings, the head and the listed blocks
copied from it (DistilBERT's initialisation from every other teacher layer; Minitron's depth pruning),
``config.num_hidden_layers`` set to match. ``pretrained: false`` builds the architecture from the
folder's config with fresh weights; ``config: {hidden_size: 128, num_hidden_layers: 4, ...}`` changes
keys of that config first (a narrower or shallower student of the teacher's family); ``head: new`` puts a fresh classification head sized to the data
on the pretrained body (a base model, or one trained for other classes).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import DistilleryError
from . import MODELS

TASKS = {"sequence-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification",
         "causal-lm": "AutoModelForCausalLM", "feature-extraction": "AutoModel"}


def _blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) of the model's repeated blocks (the largest ModuleList)."""
    best = None
    for m in model.modules():
        for attr, child in m.named_children():
            if isinstance(child, nn.ModuleList) and (best is None or len(child) > len(best[2])):
                best = (m, attr, child)
    if best is None:
        raise DistilleryError(f"{type(model).__name__} has no list of blocks to keep layers of; leave out layers:.")
    return best


@MODELS.register("hf")
def hf(input_shape: tuple[int, ...], num_classes: int, path: str = "", task: str = "sequence-classification",
       layers: list[int] | None = None, pretrained: bool = True, head: str = "keep",
       config: dict | None = None) -> nn.Module:
    from ..lm.models import from_pretrained, require_transformers

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()  # no bar per load on the run's stderr
    folder = Path(path)
    if not path or not (folder / "config.json").is_file():
        raise DistilleryError(f"model hf: path {path!r} is not a model folder (no config.json); give a local folder "
                              "written by save_pretrained (nothing is downloaded).")
    if task not in TASKS:
        raise DistilleryError(f"model hf: task {task!r} is not known; use one of {', '.join(TASKS)}.")
    cls = getattr(transformers, TASKS[task])
    overrides, config = config or {}, transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if not isinstance(overrides, dict):
        raise DistilleryError(f"model hf: config must be a mapping of config.json keys, got {overrides!r}.")
    for key, value in overrides.items():
        if not hasattr(config, key):
            from ..errors import close_matches

            near = close_matches(key, list(config.to_dict()))
            raise DistilleryError(f"model hf: config key {key!r} is not in {folder}'s config.json"
                                  + (f" (did you mean {near[0]!r}?)" if near else "") + ".")
        setattr(config, key, value)
    if overrides and pretrained:
        raise DistilleryError(f"model hf: config: changes {folder}'s architecture, which its pretrained weights do not "
                              "fit; add pretrained: false (a fresh model of that config; layers: [...] keeps "
                              "pretrained blocks instead).")
    if head not in ("keep", "new"):
        raise DistilleryError(f"model hf: head must be keep or new, got {head!r}.")
    extra = {}
    if task.endswith("classification") and num_classes:
        if getattr(config, "num_labels", num_classes) != num_classes and pretrained and head == "keep":
            raise DistilleryError(f"model hf: {folder} classifies {config.num_labels} classes, the data set "
                                  f"{num_classes}; use a folder trained for this data, or head: new (a fresh "
                                  "classification head on the pretrained body).")
        config.num_labels = num_classes
        if head == "new":
            extra = {"num_labels": num_classes, "ignore_mismatched_sizes": True}
    if pretrained:
        model = from_pretrained(cls, folder, **extra)
    else:
        model = cls.from_config(config)
    if layers is not None:
        parent, attr, blocks = _blocks(model)
        keep = [int(i) for i in layers]
        if not keep or any(not 0 <= i < len(blocks) for i in keep):
            raise DistilleryError(f"model hf: layers {layers} must be indices in 0..{len(blocks) - 1} of {folder}'s "
                                  f"{len(blocks)} blocks.")
        setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(model.config, key):
                setattr(model.config, key, len(keep))
        for i, block in enumerate(getattr(parent, attr)):  # attention layers that know their index
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
    model.train()
    return model
