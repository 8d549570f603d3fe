"""The runtime: devices, precision, any data set through the DataLoader, any model's inputs and
outputs, masks, run signatures, callbacks and loggers."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from distillery import runtime
from distillery.callbacks import Callback
from distillery.config import TermConfig, TrainConfig
from distillery.data import TensorData
from distillery.data.loader import ItemData, as_dataset, collate
from distillery.engine import evaluate, fit
from distillery.errors import DistilleryError
from distillery.objective import Objective
from distillery.teachers import ModuleTeacher

KD_CE = [TermConfig(loss="kd", params={"temperature": 2.0}, weight=0.7), TermConfig(loss="ce", teacher=None, weight=0.3)]


def toy(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return TensorData(x, x[:, :4].argmax(1), torch.arange(n), 4, "toy")


def models():
    torch.manual_seed(1)
    s = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.manual_seed(2)
    t = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    return s, ModuleTeacher(t)


def cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "log_every": 1, **kw})


# --------------------------------------------------------------------------- devices and precision


def test_devices_that_are_not_there_are_one_line_errors():
    assert runtime.resolve_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistilleryError, match="no CUDA device; available: cpu"):
            runtime.resolve_device("cuda:1")
    with pytest.raises(DistilleryError, match="not a device"):
        runtime.resolve_device("gpu0")
    with pytest.raises(DistilleryError, match="not supported"):
        runtime.resolve_device("meta")
    s, t = models()
    if not torch.cuda.is_available():
        with pytest.raises(DistilleryError, match="no CUDA device"):
            fit(s, Objective(KD_CE), toy(), cfg(device="cuda"), teacher=t, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_and_losses_stay_fp32(precision):
    s, t = models()
    seen = []

    class Spy(Callback):
        def on_step(self, state, record):
            seen.append(record["terms"])

    out = fit(s, Objective(KD_CE), toy(), cfg(precision=precision), teacher=t, eval_data=toy(), progress=False,
              callbacks=[Spy()])
    assert out["final"]["accuracy"] > 0.25
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in s.parameters())
    assert len(seen) == 8 and all(set(r) == {"kd", "ce"} for r in seen)


def test_fp16_uses_a_grad_scaler_and_matches_fp32_closely():
    a, t = models()
    fit(a, Objective(KD_CE), toy(), cfg(), teacher=t, progress=False)
    b, t = models()
    fit(b, Objective(KD_CE), toy(), cfg(precision="fp16"), teacher=t, progress=False)
    p = runtime.Precision("fp16", torch.device("cpu"))
    assert p.scaler is not None
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=5e-2)


def test_teacher_dtype_and_device():
    s, _ = models()
    torch.manual_seed(2)
    t = ModuleTeacher(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)), dtype=torch.bfloat16, device="cpu")
    assert next(t.model.parameters()).dtype == torch.bfloat16
    fit(s, Objective(KD_CE), toy(), cfg(), teacher=t, progress=False)
    assert all(torch.isfinite(p).all() for p in s.parameters())


# --------------------------------------------------------------------------- data from anywhere


class PairSet(Dataset):
    """A user's data set of (x, y) tuples."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.x[i], self.data.y[i]


class DictSet(PairSet):
    """A user's data set of dict items with their own ids."""

    def __getitem__(self, i):
        return {"x": self.data.x[i], "labels": int(self.data.y[i]), "id": int(self.data.ids[i])}


def test_a_user_dataset_trains_exactly_like_tensor_data():
    ref, t = models()
    fit(ref, Objective(KD_CE), toy(), cfg(), teacher=t, progress=False)
    for ds in (PairSet(toy()), DictSet(toy())):
        s, t = models()
        fit(s, Objective(KD_CE), ds, cfg(), teacher=t, progress=False)
        for a, b in zip(ref.parameters(), s.parameters()):
            assert torch.allclose(a, b, atol=1e-6)


def test_workers_give_the_same_weights_as_the_main_process():
    a, t = models()
    fit(a, Objective(KD_CE), PairSet(toy()), cfg(), teacher=t, progress=False)
    b, t = models()
    fit(b, Objective(KD_CE), PairSet(toy()), cfg(num_workers=2, prefetch_factor=2), teacher=t, progress=False)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_hf_datasets_dataset_is_taken_as_it_is():
    datasets = pytest.importorskip("datasets")
    d = toy()
    hf = datasets.Dataset.from_dict({"x": d.x.tolist(), "labels": d.y.tolist()})
    ref, t = models()
    fit(ref, Objective(KD_CE), d, cfg(), teacher=t, progress=False)
    s, t = models()
    fit(s, Objective(KD_CE), hf, cfg(), teacher=t, progress=False)
    for a, b in zip(ref.parameters(), s.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_collate_pads_sequences_and_refuses_what_it_cannot_pad():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1]), "id": torch.tensor(0)},
             {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]), "id": torch.tensor(1)}]
    with pytest.raises(DistilleryError, match="pad_values"):
        collate(items)
    b = collate(items, {"input_ids": 0})
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(DistilleryError, match="beyond the first"):
        collate([{"x": torch.zeros(2, 3)}, {"x": torch.zeros(2, 4)}])
    with pytest.raises(DistilleryError, match="missing"):
        collate([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}])


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from ({"x": torch.zeros(3)} for _ in range(4))


def test_bad_items_are_one_line_errors():
    class Strings(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return object()

    with pytest.raises(DistilleryError, match="items must be dicts"):
        ItemData(Strings())
    with pytest.raises(DistilleryError, match="no length"):
        as_dataset(Stream())
    s, t = models()
    with pytest.raises(DistilleryError, match="no input key"):
        fit(s, Objective(KD_CE), DictSet(toy()), cfg(inputs=["input_ids"]), teacher=t, progress=False)


# --------------------------------------------------------------------------- models from anywhere


def tiny_bert(layers, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


class Sentences(Dataset):
    """Token sequences of different lengths with HF-style items (input_ids, attention_mask, labels)."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(3)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(3, 9, (1,), generator=g))
            ids = torch.randint(1, 40, (length,), generator=g)
            self.rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                              "labels": int(ids[0] % 3)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_a_hugging_face_model_distils_from_dict_batches(tmp_path):
    teacher = ModuleTeacher(tiny_bert(2, 0))
    student = tiny_bert(1, 1)
    data = as_dataset(Sentences(), pad_values={"input_ids": 0})
    terms = [TermConfig(loss="kd", params={"temperature": 2.0}),
             TermConfig(loss="hint", student="bert.encoder.layer.0", teacher="bert.encoder.layer.1")]
    out = fit(student, Objective(terms), data, cfg(epochs=3, optimizer="adamw", lr=3e-3), teacher=teacher,
              eval_data=data, run_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert set(train[0]["terms"]) == {"kd", "hint"} and train[-1]["terms"]["kd"] < train[0]["terms"]["kd"]
    assert out["final"]["agreement"] is not None and 0 <= out["final"]["accuracy"] <= 1


def test_outputs_are_read_as_logits_whatever_their_form():
    z = torch.randn(2, 3)
    assert runtime.logits_of(z) is z
    assert runtime.logits_of((z, "x")) is z
    assert runtime.logits_of({"logits": z}) is z

    class Out:
        logits = z

    assert runtime.logits_of(Out()) is z
    with pytest.raises(DistilleryError, match="returned no logits"):
        runtime.logits_of({"hidden": z})

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 4)

        def forward(self, x):
            return {"features": self.lin(x)}

    _, t = models()
    with pytest.raises(DistilleryError, match="student returned no logits"):
        fit(NoLogits(), Objective(KD_CE), toy(), cfg(), teacher=t, progress=False)


def test_inputs_go_to_the_model_as_they_are():
    x = torch.zeros(2, 3)
    assert runtime.model_inputs({"x": x, "id": 1}) == ((x,), {})
    args, kw = runtime.model_inputs({"x": {"a": x}, "id": 1})
    assert args == () and set(kw) == {"a"}
    args, kw = runtime.model_inputs({"input_ids": x, "attention_mask": x, "y": x, "id": x, "mask": x})
    assert set(kw) == {"input_ids", "attention_mask"}
    with pytest.raises(DistilleryError, match="no model input"):
        runtime.model_inputs({"id": x, "y": x})


# --------------------------------------------------------------------------- masks and devices


def test_integer_masks_are_masks_never_row_indices():
    from distillery.losses.tokens import token_loss

    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    m = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]])
    obj = Objective([TermConfig(loss="kd")])
    got = obj({"logits": s}, {"logits": t}, {"id": torch.arange(2), "mask": m})["total"]
    want = token_loss("kd", s, t, mask=m.bool(), temperature=4.0)
    assert torch.allclose(got, want)
    hidden = Objective([TermConfig(loss="hint", student="h", teacher="h", adapter="none")])
    h_s, h_t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    got = hidden({"logits": s, "h": h_s}, {"h": h_t}, {"id": torch.arange(2), "mask": m})["total"]
    from distillery.losses import get

    assert torch.allclose(got, get("hint")(h_s[m.bool()], h_t[m.bool()]), atol=1e-6)
    with pytest.raises(DistilleryError, match="0 or 1 only"):
        runtime.as_bool_mask(torch.tensor([0, 2]), "mask")
    with pytest.raises(DistilleryError, match="bool or 0/1"):
        runtime.as_bool_mask(torch.tensor([0.0, 1.0]), "mask")


def test_a_batch_on_two_devices_is_refused():
    with pytest.raises(DistilleryError, match="different devices"):
        runtime.check_one_device({"x": torch.zeros(1), "y": torch.zeros(1, device="meta")}, "data")


def test_fsdp_with_one_process_is_refused():
    s, t = models()
    with pytest.raises(DistilleryError, match="one process"):
        fit(s, Objective(KD_CE), toy(), cfg(strategy="fsdp"), teacher=t, progress=False)


# --------------------------------------------------------------------------- resume that cannot hand back stale weights


def test_resume_against_another_run_names_what_differs(tmp_path):
    s, t = models()
    fit(s, Objective(KD_CE), toy(), cfg(), teacher=t, run_dir=tmp_path, progress=False)
    other = [TermConfig(loss="kd", params={"temperature": 4.0}, weight=0.7), KD_CE[1]]
    s, t = models()
    with pytest.raises(DistilleryError, match=r"objective\.terms.*temperature"):
        fit(s, Objective(other), toy(), cfg(), teacher=t, run_dir=tmp_path, progress=False)
    with pytest.raises(DistilleryError, match=r"train\.precision"):
        fit(s, Objective(KD_CE), toy(), cfg(precision="bf16"), teacher=t, run_dir=tmp_path, progress=False)
    with pytest.raises(DistilleryError, match="teacher"):
        fit(s, Objective(KD_CE), toy(), cfg(), teacher=ModuleTeacher(nn.Linear(12, 4)), run_dir=tmp_path,
            progress=False)
    with pytest.raises(DistilleryError, match="data"):
        fit(s, Objective(KD_CE), toy(80), cfg(), teacher=t, run_dir=tmp_path, progress=False)
    with pytest.raises(DistilleryError, match="already holds"):
        fit(s, Objective(KD_CE), toy(), cfg(), teacher=t, run_dir=tmp_path, resume=False, progress=False)
    out = fit(s, Objective(KD_CE), toy(), cfg(num_workers=1, log_every=5), teacher=t, run_dir=tmp_path,
              progress=False)
    assert out["resumed"]  # runtime settings (workers, logging) may change


# --------------------------------------------------------------------------- callbacks and loggers


def test_callbacks_see_every_event_and_can_stop(tmp_path):
    events = []

    class Watch(Callback):
        def on_step(self, state, record):
            events.append(("step", state.global_step))
            if state.global_step == 5:
                state.stop = True

        def on_eval(self, state, record):
            events.append(("eval", record["accuracy"] is not None))

        def on_epoch(self, state):
            events.append(("epoch", state.epoch))

        def on_checkpoint(self, state, path):
            events.append(("checkpoint", path.name))

    s, t = models()
    fit(s, Objective(KD_CE), toy(), cfg(epochs=4), teacher=t, eval_data=toy(), run_dir=tmp_path, progress=False,
        callbacks=[Watch()])
    assert [e for e in events if e[0] == "step"] == [("step", i) for i in range(1, 6)]
    assert ("eval", True) in events and ("epoch", 2) in events and events[-1] == ("checkpoint", "last.json")
    assert ("epoch", 3) not in events  # stopped in epoch 2
    meta = json.loads((tmp_path / "checkpoints/distill/last.json").read_text())
    assert meta["done"] and meta["global_step"] == 5


def test_tensorboard_gets_every_term(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s, t = models()
    fit(s, Objective(KD_CE), toy(), cfg(loggers=["tensorboard"]), teacher=t, eval_data=toy(), run_dir=tmp_path,
        progress=False)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "distill"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"distill/terms/kd", "distill/terms/ce", "distill/loss", "distill/eval/accuracy"} <= tags
    assert len(acc.Scalars("distill/terms/kd")) == 8


def test_unknown_tracker_is_refused():
    with pytest.raises(DistilleryError, match="not a tracker"):
        TrainConfig(loggers=["neptune"])


def test_evaluate_reports_perplexity_for_token_models():
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 5)

        def forward(self, x):
            return self.emb(x)

    x = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    y[:, -1] = -100
    from distillery.lm.corpus import TokenData

    data = TokenData(x, y, torch.arange(6), 5, "t")
    ev = evaluate(Bigram(), data)
    assert ev["perplexity"] == pytest.approx(torch.tensor(ev["loss"]).exp().item(), rel=1e-6)
    assert 0 <= ev["accuracy"] <= 1 and "logits" not in ev


class LenStream(torch.utils.data.IterableDataset):
    """A user's stream of (x, y) items that knows its length."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for i in range(len(self.data)):
            yield self.data.x[i], self.data.y[i]


def test_a_stream_trains_like_its_items_in_order_and_resumes_by_position(tmp_path):
    from distillery.data.loader import plan

    class InOrder(TensorData):  # the same samples, epochs in the stream's order
        def order(self, seed, epoch):
            return torch.arange(len(self))

    d = toy()
    ref, t = models()
    fit(ref, Objective(KD_CE), InOrder(d.x, d.y, d.ids, 4, "in-order"), cfg(), teacher=t, progress=False)
    for workers in (0, 2):
        s, t = models()
        fit(s, Objective(KD_CE), LenStream(d), cfg(num_workers=workers), teacher=t, progress=False)
        for a, b in zip(ref.parameters(), s.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    # Killed in step 3 of 8, then resumed: the stream is read past the items of the two steps done.
    def boom(step):
        if step == 3:
            raise RuntimeError("killed")

    s, t = models()
    with pytest.raises(RuntimeError, match="killed"):
        fit(s, Objective(KD_CE), LenStream(d), cfg(checkpoint_every_steps=1), teacher=t, run_dir=tmp_path,
            progress=False, on_step=boom)
    s, t = models()
    out = fit(s, Objective(KD_CE), LenStream(d), cfg(checkpoint_every_steps=1), teacher=t, run_dir=tmp_path,
              progress=False)
    assert out["resumed"]
    for a, b in zip(ref.parameters(), s.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert len(plan(as_dataset(LenStream(d)), 0, 0, 16, 1)) == 4
    with pytest.raises(DistilleryError, match="no length"):
        as_dataset(Stream())


def test_mlflow_and_wandb_log_offline_into_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    s, t = models()
    fit(s, Objective(KD_CE), toy(), cfg(loggers=["mlflow", "wandb"]), teacher=t, run_dir=tmp_path, progress=False)
    import mlflow

    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and "metrics.distill/terms/kd" in runs.columns
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_bare_module_teacher_is_frozen_and_used():
    s, t = models()
    s2, _ = models()
    fit(s, Objective(KD_CE), toy(), cfg(), teacher=t, progress=False)
    fit(s2, Objective(KD_CE), toy(), cfg(), teacher=t.model, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(s.parameters(), s2.parameters()))
    assert not any(p.requires_grad for p in t.model.parameters())


def test_empty_sets_and_bad_numbers_are_refused():
    s, t = models()
    empty = TensorData(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4, "e")
    with pytest.raises(DistilleryError, match="training set e is empty"):
        fit(s, Objective(KD_CE), empty, cfg(), teacher=t, progress=False)
    with pytest.raises(DistilleryError, match="evaluation set e is empty"):
        fit(s, Objective(KD_CE), toy(), cfg(), teacher=t, eval_data=empty, progress=False)
    from distillery.config import safe_load

    assert safe_load("lr: 1e-3")["lr"] == 0.001  # YAML 1.1 would read a string
    for bad, match in ((dict(lr=float("nan")), "finite"), (dict(min_lr=1.0, lr=0.1), "above"),
                       (dict(warmup_epochs=-1.0), ">= 0"), (dict(weight_decay=-0.1), ">= 0"),
                       (dict(step_epochs=0), ">= 1"), (dict(momentum=1.5), r"\[0, 1\)")):
        with pytest.raises(DistilleryError, match=match):
            TrainConfig(**bad)


def test_label_items_are_targets_and_padded_token_batches_evaluate_with_a_teacher():
    class Labelled(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": torch.zeros(3), "label": i % 2}

    assert as_dataset(Labelled()).labelled  # datasets' "label" column is the target, like "labels"

    class Tokens(Dataset):  # sequences of different lengths: each batch is padded to its own length
        def __len__(self):
            return 10

        def __getitem__(self, i):
            ids = torch.arange(1, 3 + i) % 5
            return {"x": ids, "y": ids.roll(-1)}

    class Bigram(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = nn.Embedding(5, 5)

        def forward(self, x):
            return self.emb(x)

    data = as_dataset(Tokens(), pad_values={"x": 0})
    teacher = ModuleTeacher(Bigram(0))
    from distillery.data.loader import iter_batches

    preds = [teacher({"x": b["x"]})["logits"].argmax(-1) for b in iter_batches(data, 4)]
    assert len({p.shape[1] for p in preds}) > 1  # the batches differ in length
    ev = evaluate(Bigram(0), data, preds, batch_size=4)
    assert ev["agreement"] == 1.0 and 0 <= ev["accuracy"] <= 1  # the teacher agrees with itself on every token
