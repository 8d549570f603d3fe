"""Minitron-style pruning of a transformers causal LM (Muralidharan et al. 2024, "Compact Language Models
via Pruning and Knowledge Distillation"): importances from activations on a calibration set, a smaller
model of the same architecture (transformers loads it), then recovery by token KD from the unpruned model.

- **Depth** (``layers: N``): keep the N decoder layers of highest block importance, in order. The
  importance of a layer is 1 - the mean cosine similarity of its input and output hidden states over
  the calibration tokens (the "BI" metric Minitron compares for depth; ShortGPT's); Minitron's other
  depth criterion (the LM loss without the layer) is not used.
- **Width** (``mlp: r``): remove the share ``r`` of every MLP's intermediate channels, ranked per layer
  by Minitron's activation importance: the channel's activation (the input of ``down_proj``) with an
  L2 norm over the sequence, then the mean over the batch.
- **Embedding channels** (``hidden: r``): remove the share ``r`` of the hidden size (rounded to a multiple of
  the head count, which transformers requires of ``hidden_size``), ranked by the same
  aggregation of every RMSNorm's output (Minitron's LayerNorm-activation importance), summed over the
  norms; every matrix reading or writing the residual stream, the norms and the embeddings are sliced
  (the attention's head size is kept: ``config.head_dim``).
- **Attention heads** (``heads: r``): remove the share ``r`` of the key-value groups (with grouped-query
  attention a key-value head and its query heads go together), ranked by the summed importance of
  their query heads: each head's output (the input of ``o_proj``) with an L2 norm over the sequence
  and the head's vector, the mean over the batch.

Works on Llama-style models (``model.layers[i].mlp.{gate,up,down}_proj``), the built-in ones included.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import DistilleryError


@dataclass
class LMPrune:
    """``prune:`` of an lm recipe: the recipe's ``model`` pruned before it trains."""

    layers: int | None = None
    """Decoder layers kept (depth pruning); null keeps them all."""
    mlp: float | None = None
    """Share of every MLP's intermediate channels removed (width pruning); null removes none."""
    hidden: float | None = None
    """Share of the embedding (hidden) channels removed; null removes none."""
    heads: float | None = None
    """Share of the attention's key-value groups removed (with their query heads); null removes none."""
    calibration: int = 64
    """Training blocks the importances are measured on."""
    keep: list[int] | None = None
    """Copy exactly these decoder layers, in order (DistilBERT's student: every other teacher layer); no
    importance is measured. Any architecture whose decoder layers transformers keeps in one list."""

    def __post_init__(self) -> None:
        if self.layers is None and self.mlp is None and self.hidden is None and self.heads is None and not self.keep:
            raise DistilleryError("prune: give layers (depth), keep (layer indices), mlp, hidden or heads (width), or "
                                  "leave prune out.")
        if self.keep is not None and (self.layers is not None or not self.keep or len(set(self.keep)) != len(self.keep)
                                      or min(self.keep) < 0):
            raise DistilleryError(f"prune.keep must be distinct layer indices >= 0, without prune.layers; got {self.keep}.")
        if self.layers is not None and self.layers < 1:
            raise DistilleryError(f"prune.layers keeps at least 1 layer, got {self.layers}.")
        for key in ("mlp", "hidden", "heads"):
            r = getattr(self, key)
            if r is not None and not (math.isfinite(r) and 0 < r < 1):
                raise DistilleryError(f"prune.{key} is the share of channels removed, in (0, 1); got {r} (1 would "
                                      "leave the layers empty).")
        if self.calibration < 1:
            raise DistilleryError("prune.calibration must be at least 1.")


def decoder_layers(hf: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, the list of decoder layers) of a transformers causal LM: ``model.layers``
    (Llama, Qwen, Mistral, Gemma, ...), ``transformer.h`` (GPT-2), ``gpt_neox.layers``, ``model.decoder.layers`` (OPT)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        owner = hf
        *head, last = path.split(".")
        for part in head:
            owner = getattr(owner, part, None)
        layers = getattr(owner, last, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return owner, last, layers
    raise DistilleryError(f"{type(hf).__name__} keeps its decoder layers in no list distillery knows (model.layers, "
                          "transformer.h, gpt_neox.layers, model.decoder.layers); shrink it by hand.")


def keep_layers(hf: nn.Module, keep: list[int]) -> None:
    """Keep the decoder layers ``keep`` of ``hf`` (in place), with the config and layer indices updated."""
    owner, attr, layers = decoder_layers(hf)
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad:
        raise DistilleryError(f"the model has {len(layers)} layers (0..{len(layers) - 1}); cannot keep layer {bad[0]}.")
    setattr(owner, attr, nn.ModuleList([layers[i] for i in keep]))
    for i, blk in enumerate(getattr(owner, attr)):  # attention layers that know their index (key-value cache)
        for m in blk.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    hf.config.num_hidden_layers = len(keep)
    if getattr(hf.config, "layer_types", None) is not None:
        hf.config.layer_types = [hf.config.layer_types[i] for i in keep]


def _layers(hf: nn.Module) -> nn.ModuleList:
    try:
        layers = decoder_layers(hf)[2]
    except DistilleryError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(blk, "mlp") and hasattr(blk.mlp, "down_proj")
                                                        for blk in layers):
        raise DistilleryError(f"prune: {type(hf).__name__} is not a Llama-style model (model.layers[i].mlp."
                              "down_proj); prune one that is, or leave prune out.")
    return layers


@torch.no_grad()
def importances(model, ids: Tensor) -> tuple[Tensor, list[Tensor], Tensor, list[Tensor]]:
    """(block importance per layer (L,), MLP channel importance per layer [(I,)], embedding channel
    importance (H,), attention head importance per layer [(heads,)]) on the calibration ``ids``."""
    layers = _layers(model.hf)
    cos: list[list[Tensor]] = [[] for _ in layers]
    chan: list[list[Tensor]] = [[] for _ in layers]
    head: list[list[Tensor]] = [[] for _ in layers]
    emb: list[Tensor] = []
    hooks = []
    n_heads = model.hf.config.num_attention_heads
    for i, blk in enumerate(layers):
        def o_hook(mod, args, i=i):
            a = args[0].float()  # (B, T, heads * head_dim)
            head[i].append(a.reshape(*a.shape[:2], n_heads, -1).pow(2).sum((1, 3)).sqrt())  # (B, heads)
        hooks.append(blk.self_attn.o_proj.register_forward_pre_hook(o_hook))
    for m in model.hf.modules():
        if type(m).__name__.endswith("RMSNorm") or isinstance(m, nn.LayerNorm):
            hooks.append(m.register_forward_hook(lambda mod, a, out: emb.append(out.float().norm(dim=1).mean(0))))
    for i, blk in enumerate(layers):
        def block_hook(mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos[i].append(nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).reshape(-1))

        def down_hook(mod, args, i=i):
            a = args[0].float()  # (B, T, I): the channels' activations
            chan[i].append(a.norm(dim=1))  # L2 over the sequence -> (B, I)
        hooks.append(blk.register_forward_hook(block_hook, with_kwargs=True))
        hooks.append(blk.mlp.down_proj.register_forward_pre_hook(down_hook))
    was = model.training
    model.eval()
    try:
        for lo in range(0, len(ids), 16):
            model(ids[lo:lo + 16])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    block = torch.stack([1 - torch.cat(c).mean() for c in cos])
    return (block, [torch.cat(c).mean(0) for c in chan], torch.stack(emb).sum(0),  # means over the batch
            [torch.cat(h).mean(0) for h in head])


def prune(model, cfg: LMPrune, ids: Tensor):
    """A smaller copy of ``model`` (a ``CausalLM``), pruned by ``cfg`` on the calibration ``ids``."""
    from ..lm.models import CausalLM

    hf = copy.deepcopy(model.hf)
    if cfg.layers is None and cfg.mlp is None and cfg.hidden is None and cfg.heads is None:
        keep_layers(hf, list(cfg.keep or []))  # a copy of chosen layers: no importances, any architecture
        return CausalLM(hf, model.vocab_size)
    block, chan, emb, head = importances(model, ids)
    layers = _layers(hf)
    if cfg.heads is not None:
        _prune_heads(hf, layers, head, cfg.heads)
    if cfg.hidden is not None:  # a multiple of the head count: transformers checks hidden_size % heads
        heads_n = hf.config.num_attention_heads
        keep_n = max(heads_n, round(len(emb) * (1 - cfg.hidden) / heads_n) * heads_n)
        _prune_hidden(hf, emb.topk(keep_n).indices.sort().values)
    if cfg.mlp is not None:
        inter = layers[0].mlp.down_proj.in_features
        keep_n = max(1, round(inter * (1 - cfg.mlp)))
        for blk, imp in zip(layers, chan):
            keep = imp.topk(keep_n).indices.sort().values
            mlp = blk.mlp
            for name in ("gate_proj", "up_proj"):
                setattr(mlp, name, _rows(getattr(mlp, name), keep))
            mlp.down_proj = _cols(mlp.down_proj, keep)
        hf.config.intermediate_size = keep_n
    if cfg.layers is not None:
        if cfg.layers > len(layers):
            raise DistilleryError(f"prune.layers: the model has {len(layers)} layers, cannot keep {cfg.layers}.")
        keep_layers(hf, block.topk(cfg.layers).indices.sort().values.tolist())
    if cfg.keep:
        keep_layers(hf, list(cfg.keep))
    return CausalLM(hf, model.vocab_size)


def _prune_heads(hf: nn.Module, layers: nn.ModuleList, importance: list[Tensor], share: float) -> None:
    """Keep the most important key-value groups of every layer (the same count in each), with their
    query heads: q, k, v rows and o columns of the removed heads go."""
    cfg = hf.config
    n_q, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    group, d = n_q // n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    keep_n = max(1, round(n_kv * (1 - share)))
    for blk, imp in zip(layers, importance):
        kv = imp.reshape(n_kv, group).sum(1).topk(keep_n).indices.sort().values
        q_heads = (kv[:, None] * group + torch.arange(group)).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
        kv_rows = (kv[:, None] * d + torch.arange(d)).reshape(-1)
        att = blk.self_attn
        att.q_proj = _rows(att.q_proj, q_rows)
        att.k_proj = _rows(att.k_proj, kv_rows)
        att.v_proj = _rows(att.v_proj, kv_rows)
        att.o_proj = _cols(att.o_proj, q_rows)
    cfg.head_dim = d
    cfg.num_attention_heads, cfg.num_key_value_heads = keep_n * group, keep_n


def _prune_hidden(hf: nn.Module, keep: Tensor) -> None:
    """Keep the embedding channels ``keep`` everywhere the residual stream is read or written."""
    cfg = hf.config
    cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # kept as it was
    emb = hf.get_input_embeddings()
    new = nn.Embedding(emb.num_embeddings, len(keep), padding_idx=emb.padding_idx, dtype=emb.weight.dtype,
                       device=emb.weight.device)
    new.weight.data.copy_(emb.weight.data[:, keep])
    hf.set_input_embeddings(new)
    for name, m in list(hf.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = hf.get_submodule(parent_name) if parent_name else hf
        if type(m).__name__.endswith("RMSNorm"):
            m.weight = nn.Parameter(m.weight.data[keep].clone())
        elif isinstance(m, nn.Linear) and attr in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            setattr(parent, attr, _cols(m, keep))
        elif isinstance(m, nn.Linear) and attr in ("o_proj", "down_proj"):
            setattr(parent, attr, _rows(m, keep))
    head = hf.get_output_embeddings()
    if getattr(cfg, "tie_word_embeddings", False):
        hf.tie_weights()
    else:
        hf.set_output_embeddings(_cols(head, keep))
    cfg.hidden_size = len(keep)


def _rows(layer: nn.Linear, keep: Tensor) -> nn.Linear:
    out = nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None, dtype=layer.weight.dtype,
                    device=layer.weight.device)
    out.weight.data.copy_(layer.weight.data[keep])
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data[keep])
    return out


def _cols(layer: nn.Linear, keep: Tensor) -> nn.Linear:
    out = nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype,
                    device=layer.weight.device)
    out.weight.data.copy_(layer.weight.data[:, keep])
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data)
    return out
