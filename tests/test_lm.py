"""Language-model distillation: models and folders, corpus and tokenizer, sampling, KD modes, recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distillery.config import TrainConfig
from distillery.errors import DistilleryError
from distillery.lm import corpus
from distillery.lm import distill as D
from distillery.lm.generate import sample, warp
from distillery.lm.models import check_same_tokenizer, llama, load_lm, save_lm
from distillery.objective import Term

TEXT = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3 for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return corpus.train_tokenizer(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def data(tok):
    rows = corpus.blocks(corpus.encode_documents(TEXT, tok), 24)
    return corpus.TokenData.from_blocks(rows, len(tok), "toy")


def _cfg(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 8, "lr": 3e-3, "log_every": 1000, **kw})


# ------------------------------------------------------------------------------------ models


def test_padded_vocabulary_is_sliced_to_the_tokenizer(tok):
    v = len(tok)
    m = llama("tiny", vocab_size=v, pad_to=64)
    assert m.hf.get_output_embeddings().weight.shape[0] == 320 > v
    assert m(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, v)


def test_save_load_round_trip_and_damage(tmp_path, tok):
    m = llama("tiny", vocab_size=len(tok), seed=3, pad_to=64)
    save_lm(m, tok, tmp_path / "m")
    m2, tok2 = load_lm(tmp_path / "m")
    x = torch.randint(0, len(tok), (2, 7))
    assert torch.equal(m(x), m2(x)) and m2.vocab_size == m.vocab_size
    check_same_tokenizer(tok, tok2)
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(DistilleryError, match="checksum"):
        load_lm(tmp_path / "m")
    with pytest.raises(DistilleryError, match="not a model folder"):
        load_lm(tmp_path / "nothing")
    save_lm(m, tok, tmp_path / "c")  # an edited config.json (here: one layer fewer) is damage too
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistilleryError, match=r"config\.json is missing or does not match its checksum"):
        load_lm(tmp_path / "c")


def test_a_folder_without_its_checksum_record_is_refused_unless_asked(tmp_path, tok):
    m = llama("tiny", vocab_size=len(tok), seed=3)
    save_lm(m, tok, tmp_path / "m")
    record = tmp_path / "m" / "distillery_lm.json"
    meta = json.loads(record.read_text())
    record.unlink()  # the record gone: flipped weights would load silently
    with pytest.raises(DistilleryError, match=r"no checksum record.*--unverified"):
        load_lm(tmp_path / "m")
    x = torch.randint(0, len(tok), (1, 5))
    m2, _ = load_lm(tmp_path / "m", verify=False)  # a folder from elsewhere, knowingly
    assert m2(x).shape[-1] >= len(tok)
    record.write_text(json.dumps({**meta, "files": {}}))  # an emptied list is no record either
    with pytest.raises(DistilleryError, match="no checksum record"):
        load_lm(tmp_path / "m")
    record.write_text(json.dumps({**meta, "files": {"../../etc/passwd": "0" * 64}}))
    with pytest.raises(DistilleryError, match="outside the folder"):
        load_lm(tmp_path / "m")


def test_different_tokenizers_are_refused(tok):
    other = corpus.train_tokenizer(["completely different words here " * 20], vocab_size=280)
    with pytest.raises(DistilleryError, match="different tokenizers"):
        check_same_tokenizer(tok, other)


# ------------------------------------------------------------------------------------ corpus


def test_stdlib_split_is_by_file_disjoint_and_fixed():
    files = corpus.stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    a, b = corpus.split_files(files, 0), corpus.split_files(files, 0)
    assert a == b
    sets = [set(v) for v in a.values()]
    assert sum(map(len, sets)) == len(files) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert a != corpus.split_files(files, 1)


def test_blocks_targets_and_prompt_mask(tok):
    stream = corpus.encode_documents(["abc def", "ghi"], tok)
    assert stream[-1] == tok.convert_tokens_to_ids(corpus.EOS)
    rows = corpus.blocks(stream, 3)
    d = corpus.TokenData.from_blocks(rows, len(tok), prompt=2)
    assert torch.equal(d.x[0], torch.as_tensor(rows[0, :3]).long())
    assert d.y[0, 0] == -100 and d.y[0, 1] == rows[0, 2]
    assert torch.equal(d.batch(torch.tensor([0]))["mask"], d.y[:1] != -100)
    with pytest.raises(DistilleryError, match="fewer than one block"):
        corpus.blocks(stream[:2], 8)


def test_read_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert corpus.read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"body": 1}\n')
    with pytest.raises(DistilleryError, match=r"b\.jsonl:2 has no string field 'text'"):
        corpus.read_texts(tmp_path / "b.jsonl")
    (tmp_path / "c.txt").write_text("hello")
    assert corpus.read_texts(tmp_path / "c.txt") == ["hello"]
    with pytest.raises(DistilleryError, match="does not exist"):
        corpus.read_texts(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------ sampling


def test_greedy_with_cache_equals_full_recompute(tok):
    m = llama("tiny", vocab_size=len(tok), seed=1)
    prompt = torch.randint(0, len(tok), (3, 4), generator=torch.Generator().manual_seed(0))
    out = sample(m, prompt, 6, temperature=0)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.ids, ids) and out.logprobs.shape == (3, 6)
    a = sample(m, prompt, 5, generator=torch.Generator().manual_seed(7))
    b = sample(m, prompt, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ids, b.ids)


def test_warp_top_k_and_top_p_by_hand():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = warp(z, 1.0, top_p=0.8).exp()  # 0.5 + 0.3 reaches 0.8: two tokens kept
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    p = warp(z, 1.0, top_k=3).exp()
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    assert torch.equal(warp(z, 0.0).exp(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    p = warp(z, 2.0).exp()
    q = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(p[0], q / q.sum(), atol=1e-6)


# ------------------------------------------------------------------------------------ distillation


def _kl_to(teacher, student, data) -> float:
    b = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        from distillery.losses.tokens import token_loss

        return float(token_loss("kd", student(b["x"]), teacher(b["x"]), mask=b["mask"], temperature=1.0))


@pytest.mark.parametrize("loss", ["kd", "generalized_jsd"])
def test_token_kd_moves_the_student_to_the_teacher(tok, data, loss):
    v = len(tok)
    teacher = llama("tiny", vocab_size=v, seed=0)
    D.train(teacher, data, _cfg(epochs=3), progress=False)
    student = llama("tiny", vocab_size=v, seed=1, hidden_size=16, intermediate_size=32)
    before = _kl_to(teacher, student, data)
    D.distil(student, teacher, data, _cfg(epochs=3), terms=[Term(loss)], chunk_size=16, progress=False)
    assert _kl_to(teacher, student, data) < 0.7 * before


def test_perplexity_is_exp_of_mean_cross_entropy(tok, data):
    m = llama("tiny", vocab_size=len(tok), seed=2)
    b = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        logits = m(b["x"])
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["y"].reshape(-1))
    assert D.perplexity(m, data, batch_size=5) == pytest.approx(math.exp(float(ce)), rel=1e-4)


def test_sequence_level_data_from_the_teacher(tok, data):
    teacher = llama("tiny", vocab_size=len(tok), seed=0)
    prompts = D.prompts_of(data, 4)
    a = D.teacher_texts(teacher, prompts, 6, samples=2, seed=5, batch_size=64)
    b = D.teacher_texts(teacher, prompts, 6, samples=2, seed=5)
    assert a.x.shape == (2 * len(data), 9) and torch.equal(a.x, b.x)
    assert torch.equal(a.x[0, :4], prompts[0]) and torch.equal(a.x[1, :4], prompts[0])
    assert (a.y[:, :3] == -100).all() and (a.y[:, 3:] != -100).all()
    assert a.settings["samples"] == 2 and a.settings["temperature"] == 1.0
    with pytest.raises(DistilleryError, match="greedy"):
        D.teacher_texts(teacher, prompts, 6, samples=2, temperature=0)


def test_on_policy_share_and_determinism(tok, data):
    student = llama("tiny", vocab_size=len(tok), seed=1)
    never = D.OnPolicy(student, lam=0.0, prompt=4)
    always = D.OnPolicy(student, lam=1.0, prompt=4)
    idx = torch.arange(6)
    assert torch.equal(never.prepare(data.batch(idx), epoch=0)["x"], data.x[:6]) and never.generated == 0
    gen = always.prepare(data.batch(idx), epoch=0)
    assert always.generated == 1 and torch.equal(gen["x"][:, :4], data.x[:6, :4])
    assert gen["x"].shape == data.x[:6].shape and (gen["y"][:, :3] == -100).all()
    assert torch.equal(gen["mask"], gen["y"] != -100)
    again = D.OnPolicy(student, lam=1.0, prompt=4)
    assert torch.equal(again.prepare(data.batch(idx), epoch=0)["x"], gen["x"])  # seeded by (seed, epoch, ids)
    half = D.OnPolicy(student, lam=0.5, prompt=4)
    for i in range(40):
        half.prepare(data.batch(torch.tensor([i % len(data), (i + 1) % len(data)])), epoch=i)
    assert 8 <= half.generated <= 32
    with pytest.raises(DistilleryError, match="lambda"):
        D.OnPolicy(student, lam=1.5)
    with pytest.raises(DistilleryError, match="block length"):
        D.OnPolicy(student, prompt=99).check(data)


def test_topk_store_for_token_sequences(tmp_path, tok, data):
    from distillery.store import CachedTeacher, write_store
    from distillery.teachers import ModuleTeacher

    v = len(tok)
    teacher = llama("tiny", vocab_size=v, seed=0)
    write_store(ModuleTeacher(teacher), data, tmp_path / "s", teacher_fingerprint="t", top_k=v, dtype="float32",
                batch_size=4)
    ans = CachedTeacher(tmp_path / "s")(data.batch(torch.tensor([3, 1])))["logits"]
    assert ans.log_probs.shape == (2, data.x.shape[1], v)
    from distillery.losses.tokens import token_loss

    s = torch.randn(2, data.x.shape[1], v)
    mask = data.batch(torch.tensor([3, 1]))["mask"]
    dense = token_loss("kd", s, teacher(data.x[[3, 1]]), mask=mask, temperature=1.0)
    assert torch.allclose(token_loss("kd", s, ans, mask=mask, temperature=1.0), dense, atol=1e-4)


# ------------------------------------------------------------------------------------ recipes and CLI


def test_recipe_checks():
    from distillery.config import from_dict
    from distillery.lm.config import LMRecipe

    with pytest.raises(DistilleryError, match="Did you mean 'reverse_kl'"):
        from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "terms": [{"loss": "reverse_k"}]})
    with pytest.raises(DistilleryError, match="from a teacher"):
        from_dict(LMRecipe, {"kind": "lm", "method": "seq_kd"})
    with pytest.raises(DistilleryError, match="teacher is null"):
        from_dict(LMRecipe, {"kind": "lm", "terms": [{"loss": "kd"}]})
    with pytest.raises(DistilleryError, match="only losses that read sparse"):
        from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "method": "topk", "terms": [{"loss": "tvd"}]})
    with pytest.raises(DistilleryError, match="unknown parameter 'beta'"):
        from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "terms": [{"loss": "kd", "beta": 0.5}]})
    with pytest.raises(DistilleryError, match="not a token loss"):  # a logit loss that needs class targets
        from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "terms": [{"loss": "dkd"}]})
    with pytest.raises(DistilleryError, match="terms is empty"):
        from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "terms": []})
    r = from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "terms": [
        {"loss": "generalized_jsd", "beta": 0.5}, {"loss": "ce", "teacher": None, "weight": 0.5},
        {"loss": "hint", "student": "hf.model.layers.1", "teacher": "hf.model.layers.1"}]})
    assert [t.name for t in r.objective()] == ["generalized_jsd", "ce", "hint"]
    assert [t.name for t in from_dict(LMRecipe, {"kind": "lm", "teacher": "t", "method": "seq_kd"}).objective()] == ["ce"]


def _rows(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["kind"] == "lm"
    assert (run / "config.yaml").is_file() and (run / "report" / "report.html").is_file()
    assert (run / "report" / "perplexity.png").is_file() and (run / "metrics.jsonl").is_file()
    return {r["model"]: r for r in summary["rows"]}


def test_cli_trains_a_teacher_then_distils_from_it(tmp_path, capsys):
    from distillery.cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    common = [f"data={docs}", "block=16", "vocab_size=300", "model=tiny", "train.batch_size=8", "train.log_every=1000",
              "seq_kd.prompt=4", "seq_kd.new_tokens=12", "on_policy.prompt=4", f"runs_dir={tmp_path / 'runs'}"]
    assert main(["run", "lm/teacher", *common, "--out", str(tmp_path / "t"), "--quiet"]) == 0
    alone = _rows(tmp_path / "t")["tiny"]
    assert alone["method"] == "alone" and alone["validation_perplexity"] > 1
    teacher = str(tmp_path / "t" / "models" / "model")
    for method in ("kd", "topk", "seq_kd", "on_policy", "adaspec"):
        ref = [f"reference={tmp_path / 'kd' / 'models' / 'model'}"] if method == "adaspec" else []
        assert main(["run", "lm/kd", *common, f"teacher={teacher}", f"method={method}", *ref,
                     "--out", str(tmp_path / method), "--quiet"]) == 0, method
        rows = _rows(tmp_path / method)
        assert rows["tiny"]["method"] == method and math.isfinite(rows["tiny"]["validation_perplexity"])
        assert rows["teacher"]["validation_perplexity"] == pytest.approx(alone["validation_perplexity"], rel=1e-4)
    assert main(["run", "lm/kd", *common, f"teacher={teacher}", "method=topk", "top_k=16", "codec=packed",
                 "--out", str(tmp_path / "packed"), "--quiet"]) == 0  # the compact store
    manifest = json.loads(next((tmp_path / "packed" / "work").glob("store-*/manifest.json")).read_text())
    assert manifest["codec"]["k"] == 16 and math.isfinite(_rows(tmp_path / "packed")["tiny"]["validation_perplexity"])
    store = tmp_path / "shared" / "dense"
    for i in (1, 2):  # the second run reads the store the first wrote
        assert main(["lm", "lm/kd", *common, f"teacher={teacher}", f"store={store}", "--out", str(tmp_path / f"d{i}"),
                     "--quiet"]) == 0  # the old form: runs, saying the `run` form
    assert json.loads((store / "manifest.json").read_text())["dtype"] == "float16"
    out, err = capsys.readouterr()
    assert "validation_perplexity" in out and "note: `distillery lm` is `distillery run lm/kd" in err
    assert main(["run", "lm/kd", "teacher=" + str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # a run that failed before any checkpoint leaves nothing


def test_adaspec_data_keeps_the_share_and_carries_the_target(tok, data):
    from distillery.lm.adaspec import AdaSPEC, BatchTeacher, adaspec_mask

    v = len(tok)
    target, ref, draft = (llama("tiny", vocab_size=v, seed=s) for s in (0, 1, 2))
    view = AdaSPEC(draft, ref, target, keep=0.4)
    idx = torch.arange(5)
    b = view.prepare(data.batch(idx))
    full = data.batch(idx)
    want = adaspec_mask(draft(full["x"]), ref(full["x"]), target(full["x"]), full["mask"], 0.4)
    assert torch.equal(b["mask"], want) and int(b["mask"].sum()) == round(0.4 * int(full["mask"].sum()))
    assert ((b["y"] == -100) == ~b["mask"]).all()
    assert torch.equal(BatchTeacher()(b)["logits"], target(full["x"]))
    assert view.valid == int(full["mask"].sum()) and view.kept == int(b["mask"].sum())
    with pytest.raises(DistilleryError, match="teacher_logits"):
        BatchTeacher()(full)


def test_hidden_state_terms_through_taps_and_adapters(tmp_path, tok, data):
    from distillery.objective import Term

    v = len(tok)
    teacher = llama("tiny", vocab_size=v, seed=0)
    student = llama("tiny", vocab_size=v, seed=1, hidden_size=16, intermediate_size=32)
    hint = Term("hint", student="hf.model.layers.1", teacher="hf.model.layers.1")
    D.distil(student, teacher, data, _cfg(log_every=1), terms=[Term("kd"), hint], run_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    terms = [r["terms"] for r in records if r["event"] == "train"]
    assert {"kd", "hint"} <= set(terms[0]) and terms[-1]["hint"] < terms[0]["hint"]
    assert hint.adapter_module is not None and hint.adapter_module.weight.shape == (32, 16)
    with pytest.raises(DistilleryError, match=r"hf\.model\.layers\.9"):
        D.distil(student, teacher, data, _cfg(), progress=False,
                 terms=[Term("kd"), Term("hint", student="hf.model.layers.9", teacher="hf.model.layers.1")])


def test_accumulation_averages_over_the_steps_valid_tokens(tok, data):
    """Batch 8 in one step equals batch 4 x 2 accumulation steps when the micro-batches hold very
    different numbers of valid tokens: the mean is over the step's tokens, not of micro-batch means."""
    v = len(tok)
    uneven = data.subset(torch.arange(8))
    uneven.y[:4, 3:] = -100  # the first micro-batch keeps 3 tokens per row, the second all of theirs
    teacher = llama("tiny", vocab_size=v, seed=0)
    init = torch.cat([p.detach().flatten() for p in llama("tiny", vocab_size=v, seed=1).parameters()])
    outs = []
    for batch, accum in ((8, 1), (4, 2)):
        s = llama("tiny", vocab_size=v, seed=1)
        order = type("Ordered", (type(uneven),), {"order": lambda self, seed, epoch: torch.arange(len(self))})
        d = order(uneven.x, uneven.y, uneven.ids, v, "uneven")
        D.distil(s, teacher, d, _cfg(batch_size=batch, grad_accum=accum, lr=1.0, schedule="constant", optimizer="sgd",
                                     momentum=0.0),
                 chunk_size=7, progress=False)
        outs.append(torch.cat([p.detach().flatten() for p in s.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6) and not torch.allclose(outs[0], init, atol=1e-4)


def test_settings_a_recipe_does_not_use_are_not_held_against_it():
    from distillery.lm.config import LMRecipe

    LMRecipe(block=16)  # a student-only recipe: seq_kd.prompt (32) is not used
    LMRecipe(block=16, teacher="t", method="kd")
    with pytest.raises(DistilleryError, match=r"seq_kd\.prompt"):
        LMRecipe(block=16, teacher="t", method="seq_kd")


def test_minitron_pruning_by_depth_and_width_then_kd_recovery(tmp_path, tok, data):
    from transformers import AutoModelForCausalLM

    from distillery.cli import main
    from distillery.compress.lm_prune import LMPrune, importances, prune

    v = len(tok)
    teacher = llama("tiny", vocab_size=v, seed=0)
    D.train(teacher, data, _cfg(epochs=1), progress=False)
    ids = data.x[:8]
    block, chan, emb, heads = importances(teacher, ids)
    assert block.shape == (2,) and len(chan) == 2 and chan[0].shape == (teacher.config.intermediate_size,)
    assert emb.shape == (teacher.config.hidden_size,) and heads[0].shape == (teacher.config.num_attention_heads,)
    # heads: a key-value group and its query heads removed = the original with those heads' o_proj columns zeroed
    few = prune(teacher, LMPrune(heads=0.5), ids)
    cfg = teacher.config
    assert few.config.num_key_value_heads == cfg.num_key_value_heads // 2
    assert few.config.num_attention_heads == cfg.num_attention_heads // 2
    group, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    silent = llama("tiny", vocab_size=v, seed=0)
    silent.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for blk, imp in zip(silent.hf.model.layers, heads):
            kv = imp.reshape(-1, group).sum(1)
            for g in kv.topk(cfg.num_key_value_heads - cfg.num_key_value_heads // 2, largest=False).indices:
                blk.self_attn.o_proj.weight[:, int(g) * group * d:(int(g) + 1) * group * d] = 0
    torch.testing.assert_close(few(ids), silent(ids), atol=1e-5, rtol=1e-4)
    # width: the pruned MLP is the original with the removed channels' down_proj columns zeroed
    narrow = prune(teacher, LMPrune(mlp=0.5), ids)
    inter = teacher.config.intermediate_size
    assert narrow.config.intermediate_size == inter // 2 and narrow.hf.model.layers[0].mlp.up_proj.out_features == inter // 2
    masked = llama("tiny", vocab_size=v, seed=0)
    masked.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for blk, imp in zip(masked.hf.model.layers, chan):
            gone = imp.topk(inter - inter // 2, largest=False).indices
            blk.mlp.down_proj.weight[:, gone] = 0
    torch.testing.assert_close(narrow(ids), masked(ids), atol=1e-5, rtol=1e-4)
    # depth: the most important layer kept, its weights copied
    shallow = prune(teacher, LMPrune(layers=1), ids)
    kept = int(block.argmax())
    assert shallow.config.num_hidden_layers == 1
    assert torch.equal(shallow.hf.model.layers[0].mlp.up_proj.weight, teacher.hf.model.layers[kept].mlp.up_proj.weight)
    with pytest.raises(DistilleryError, match="leave the layers empty"):
        LMPrune(mlp=1.0)
    # embedding channels: every matrix on the residual stream sliced, the head size kept
    thin = prune(teacher, LMPrune(hidden=0.5), ids)
    h = teacher.config.hidden_size
    assert thin.config.hidden_size == h // 2 and thin.hf.model.embed_tokens.weight.shape[1] == h // 2
    assert thin.hf.model.layers[0].self_attn.q_proj.weight.shape == (teacher.config.num_attention_heads *
                                                                     thin.config.head_dim, h // 2)
    assert thin(ids).shape == teacher(ids).shape and torch.isfinite(thin(ids)).all()
    # the recipe: prune the teacher's own folder, recover by KD from it; transformers loads the result
    folder = tmp_path / "t"
    save_lm(teacher, tok, folder)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    out = tmp_path / "run"
    assert main(["run", "lm/kd", f"data={docs}", "block=16", "vocab_size=300", f"teacher={folder}", f"model={folder}",
                 "prune={layers: 1, mlp: 0.5, hidden: 0.5, heads: 0.5, calibration: 8}", "train.batch_size=8", f"runs_dir={tmp_path}",
                 "--out", str(out), "--quiet"]) == 0
    rows = {r["model"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["model"]["params"] < 0.75 * rows["unpruned"]["params"] and rows["model"]["method"] == "kd"
    assert rows["pruned"]["params"] == rows["model"]["params"] and rows["pruned"]["validation_perplexity"] > 1
    hf = AutoModelForCausalLM.from_pretrained(str(out / "models" / "model"), local_files_only=True)
    assert hf.config.num_hidden_layers == 1 and hf.config.intermediate_size == inter // 2
    assert hf.config.hidden_size == teacher.config.hidden_size // 2
    assert hf.config.num_key_value_heads == teacher.config.num_key_value_heads // 2
    # self-data distillation: the unpruned model rewrites the training text, the pruned one learns it
    assert main(["run", "lm/kd", f"data={docs}", "block=16", "vocab_size=300", f"teacher={folder}", f"model={folder}",
                 "prune={layers: 1, calibration: 8}", "method=seq_kd", "terms=[{loss: ce, teacher: null}]",
                 "seq_kd.prompt=4", "seq_kd.new_tokens=12", "train.batch_size=8", f"runs_dir={tmp_path}",
                 "--out", str(tmp_path / "sdd"), "--quiet"]) == 0
    assert any((tmp_path / "sdd" / "work").glob("seq_kd-*.npz"))
