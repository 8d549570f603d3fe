"""A recipe with a Hugging Face folder as the teacher, a smaller student copied from its layers, and
JSONL text data: `distillery run` end to end, logits plus a hidden-state term (the README example)."""

import json
import random

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from distillery.cli import main  # noqa: E402

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "a", "movie", "film", "was", "is",
         "plot", "acting", "very", "quite", "really", "not"]


def _folder(path):
    """A random-init BERT classifier (4 layers, 3 classes) with a word-level tokenizer, saved as a
    transformers folder (safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    import torch

    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(str(path), safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))


def _jsonl(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(["neg", "neutral", "pos"])
            pool = {"pos": WORDS[:4], "neg": WORDS[4:8], "neutral": WORDS[8:]}[label]
            text = " ".join(rng.choice(pool + WORDS[8:]) for _ in range(rng.randint(3, 9)))
            f.write(json.dumps({"review": text, "sentiment": label}) + "\n")


RECIPE = """
name: hf/sentiment
runs_dir: {tmp}/runs
data: {{name: jsonl, train: {tmp}/train.jsonl, test: {tmp}/test.jsonl, text: review, label: sentiment,
        tokenizer: {tmp}/bert, max_length: 16}}
teacher:
  model: {{name: hf, path: {tmp}/bert, task: sequence-classification}}
  train: {{epochs: 2, batch_size: 16, lr: 0.002}}
student:
  model: {{name: hf, path: {tmp}/bert, layers: [0, 2]}}       # DistilBERT-style: every other teacher layer
baseline: {{enabled: false}}
distill:
  data: train
  terms:
    - {{loss: kd, temperature: 2.0, weight: 1.0}}
    - {{loss: hint, student: bert.encoder.layer.1, teacher: bert.encoder.layer.3, weight: 0.1}}
  train: {{epochs: 2, batch_size: 16, lr: 0.002}}
"""


def test_a_bert_folder_distilled_into_a_smaller_one_on_jsonl(tmp_path, capsys):
    _folder(tmp_path / "bert")
    _jsonl(tmp_path / "train.jsonl", 96, 0)
    _jsonl(tmp_path / "test.jsonl", 32, 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(tmp=tmp_path))
    assert main(["validate", str(recipe)]) == 0
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "distilled"} and rows["distilled"]["params"] < rows["teacher"]["params"]
    assert 0 <= rows["distilled"]["accuracy"] <= 1 and rows["distilled"]["agreement"] is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kd", "hint"} <= set(next(r["terms"] for r in records if r["event"] == "train" and r["phase"] == "distill"))
    student = transformers.BertConfig.from_pretrained(str(tmp_path / "bert"))
    assert student.num_hidden_layers == 4  # the folder itself is untouched
    out2 = tmp_path / "as-is"  # teacher.train: null uses the folder's teacher as it is (no training, no cache)
    assert main(["run", str(recipe), "--out", str(out2), "--quiet", "teacher.train=null", "distill.train.epochs=1"]) == 0
    phases = {json.loads(line)["phase"] for line in (out2 / "metrics.jsonl").read_text().splitlines()}
    assert "teacher" not in phases and "distill" in phases


@pytest.mark.parametrize(("override", "words"), [
    ("data.label=stars", "no column 'stars'"),
    ("student.model.layers=[7]", "layers [7]"),
    ("teacher.model.task=translation", "task 'translation'"),
    ("data.tokenizer=/nowhere", "tokenizer.json"),
])
def test_bad_hf_recipes_are_one_line(tmp_path, capsys, override, words):
    _folder(tmp_path / "bert")
    _jsonl(tmp_path / "train.jsonl", 8, 0)
    _jsonl(tmp_path / "test.jsonl", 8, 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(tmp=tmp_path))
    capsys.readouterr()  # the fixture's own output
    assert main(["validate", str(recipe), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_pickled_weights_are_refused(tmp_path, capsys):
    _folder(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").rename(tmp_path / "bert" / "pytorch_model.bin")
    _jsonl(tmp_path / "train.jsonl", 8, 0)
    _jsonl(tmp_path / "test.jsonl", 8, 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(tmp=tmp_path))
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 2
    assert "safetensors only" in capsys.readouterr().err


def test_a_new_head_on_a_pretrained_body(tmp_path):
    from distillery import models
    from distillery.errors import DistilleryError

    _folder(tmp_path / "bert")
    with pytest.raises(DistilleryError, match="head: new"):
        models.build("hf", (), 5, {"path": str(tmp_path / "bert")})
    m = models.build("hf", (), 5, {"path": str(tmp_path / "bert"), "head": "new"})
    assert m.config.num_labels == 5 and m.classifier.out_features == 5
    base = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "bert"))
    assert all(a.equal(b) for a, b in zip(m.bert.parameters(), base.bert.parameters()))  # the body is kept


def test_a_narrower_student_of_the_teachers_family_from_its_config(tmp_path):
    from distillery import models
    from distillery.errors import DistilleryError

    _folder(tmp_path / "bert")
    spec = {"path": str(tmp_path / "bert"), "pretrained": False,
            "config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}}
    m = models.build("hf", (), 3, spec)
    assert type(m).__name__ == "BertForSequenceClassification" and len(m.bert.encoder.layer) == 2
    assert m.config.hidden_size == 16 and m.classifier.in_features == 16
    assert models.num_params(m) < models.num_params(models.build("hf", (), 3, {"path": str(tmp_path / "bert")})) / 4
    with pytest.raises(DistilleryError, match="did you mean 'hidden_size'"):
        models.build("hf", (), 3, {**spec, "config": {"hiden_size": 16}})
    with pytest.raises(DistilleryError, match="add pretrained: false"):  # pretrained weights of another width
        models.build("hf", (), 3, {**spec, "pretrained": True})
