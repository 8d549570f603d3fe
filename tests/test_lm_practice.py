"""LLM distillation as practitioners run it: the reasoning recipes end to end, the verifier filter,
teacher answers from a local model and from a chat-completions server on loopback, on-policy rows of
chat data, cross-tokenizer pairing, LoRA adapters, and the bad inputs of each."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.cli import main
from distillery.config import TermConfig, TrainConfig
from distillery.errors import DistilleryError
from distillery.lm import chat, cross, reasoning, traces
from distillery.lm import distill as D
from distillery.lm.generate import sample
from distillery.lm.models import llama, load_lm, load_tokenizer

pytest.importorskip("transformers")

TINY = ["model=tiny", "reasoning.train=48", "reasoning.validation=8", "reasoning.test=8", "block=160",
        "vocab_size=300", "train.epochs=1", "train.batch_size=8", "seq_kd.new_tokens=24", "threads=1", "--quiet"]


@pytest.fixture(scope="module")
def tok():
    return reasoning.tokenizer(reasoning.problems(200, seed=1), vocab_size=300)


def _rows(out):
    return json.loads((out / "summary.json").read_text())["rows"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reasoning")
    assert main(["run", "lm/reasoning/teacher", *TINY, f"runs_dir={tmp / 'runs'}", "--out", str(tmp / "teacher")]) == 0
    return tmp


def test_reasoning_recipes_run_end_to_end(teacher_run):
    tmp = teacher_run
    teacher = str(tmp / "teacher" / "models" / "model")
    rows = _rows(tmp / "teacher")
    assert rows[-1]["method"] == "alone" and 0 <= rows[-1]["accuracy"] <= 100
    saved = load_tokenizer(teacher)
    assert saved.chat_template and saved.eos_token == "<|im_end|>"  # the chat tokenizer travels with the model
    base = [*TINY, f"runs_dir={tmp / 'runs'}", f"teacher={teacher}"]
    assert main(["run", "lm/reasoning/sft", *TINY, f"tokenizer={teacher}", f"runs_dir={tmp / 'runs'}",
                 "--out", str(tmp / "sft")]) == 0
    assert main(["run", "lm/reasoning/traces", *base, "verifier=none", "--out", str(tmp / "traces")]) == 0
    row = _rows(tmp / "traces")[-1]
    assert row["method"] == "seq_kd" and row["answers"] == 48 and row["kept"] + row["wrong"] + row["too_long"] + \
        row["empty"] == 48
    assert list((tmp / "traces" / "work").glob("traces-*.jsonl"))  # the teacher's answers are kept for a rerun
    assert main(["run", "lm/reasoning/on_policy", *base, "--out", str(tmp / "op")]) == 0
    assert _rows(tmp / "op")[-1]["method"] == "on_policy"
    other = tmp / "other_tok"
    reasoning.tokenizer(reasoning.problems(200, seed=1), vocab_size=280, digits=False).save_pretrained(str(other))
    for name, terms in (("uld", "[{loss: ce, teacher: null}, {loss: uld}]"),
                        ("gold", "[{loss: ce, teacher: null}, {loss: gold, teacher: spans}]")):
        assert main(["run", "lm/reasoning/cross", *base, f"tokenizer={other}", f"terms={terms}",
                     "--out", str(tmp / name)]) == 0
        student = _rows(tmp / name)[-1]
        assert student["terms"].endswith(name) and "accuracy" in student
        assert load_tokenizer(tmp / name / "models" / "model").get_vocab() == load_tokenizer(other).get_vocab()
    assert main(["run", "lm/reasoning/lora", *base, f"model={teacher}", "prune.keep=[1]", "--out", str(tmp / "lora")]) == 0
    row = _rows(tmp / "lora")[-1]
    assert 0 < row["trainable_params"] < row["params"]
    assert (tmp / "lora" / "models" / "adapter" / "adapter_config.json").is_file()


def test_lora_adapters_save_load_and_merge(teacher_run, tmp_path):
    peft = pytest.importorskip("peft")
    from distillery.lm.config import LoRA
    from distillery.lm.lora import add_lora, save_lora

    teacher, tok = load_lm(teacher_run / "teacher" / "models" / "model")
    base_before = {k: v.clone() for k, v in teacher.hf.state_dict().items()}
    student = add_lora(load_lm(teacher_run / "teacher" / "models" / "model")[0], LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    data = chat.token_data(tok, reasoning.problems(16, seed=4), 160)
    D.distil(student, teacher, data, TrainConfig(epochs=2, batch_size=8, lr=1e-2), progress=False)
    for k, v in student.hf.get_base_model().state_dict().items():  # the base stayed frozen
        if "lora_" not in k:
            assert torch.equal(v, base_before[k.replace(".base_layer", "")]), k
    merged = save_lora(student, tok, tmp_path / "models")
    x = data.x[:2]
    want = student(x)
    assert not torch.allclose(want, teacher(x), atol=1e-4)  # the adapters learned something
    assert torch.allclose(merged(x), want, atol=1e-4)
    back, _ = load_lm(tmp_path / "models" / "model")  # the merged export: a plain transformers folder
    assert torch.allclose(back(x), want, atol=1e-4)
    fresh, _ = load_lm(teacher_run / "teacher" / "models" / "model")
    adapted = peft.PeftModel.from_pretrained(fresh.hf, str(tmp_path / "models" / "adapter"))  # PEFT's own loader
    assert torch.allclose(adapted(input_ids=x).logits[..., : want.shape[-1]], want, atol=1e-4)


def test_verifier_filter_keeps_right_answers_that_fit(tok):
    ex = reasoning.problems(4, seed=5)
    right = [e["messages"][1]["content"] for e in ex]
    answers = [[right[0], "The answer is -1."], [right[1] + " " + "1 " * 300], ["   "], [right[3]]]
    kept, counts = traces.keep(ex, answers, traces.verifier("exact"), tok, max_tokens=160)
    assert counts == {"answers": 5, "kept": 2, "wrong": 1, "too_long": 1, "empty": 1}
    assert [k["messages"][1]["content"] for k in kept] == [right[0], right[3]] and kept[0]["answer"] == ex[0]["answer"]
    traces.VERIFIERS.add("shorter_than_40", lambda e, r: len(r) < 40)  # a user's verifier, as a plugin registers it
    try:
        kept, counts = traces.keep(ex[:1], [["The answer is 1.", right[0]]], traces.verifier("shorter_than_40"), tok, 160)
        assert counts["kept"] == 1 and kept[0]["messages"][1]["content"] == "The answer is 1."
    finally:
        traces.VERIFIERS._items.pop("shorter_than_40", None)
    with pytest.raises(DistilleryError, match="verifier"):
        traces.verifier("no_such")


def test_local_answers_equal_greedy_sampling_one_prompt_at_a_time(tok):
    model = llama("tiny", vocab_size=len(tok), seed=0)
    ex = reasoning.problems(3, seed=6)
    got = traces.respond(model, tok, ex, 12, batch_size=3)
    for e, (answer,) in zip(ex, got):
        ids = torch.tensor([tok(chat.prompt_text(tok, e), add_special_tokens=False)["input_ids"]])
        new = sample(model, ids, 12, temperature=0, eos_id=tok.eos_token_id).ids[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert answer == tok.decode(new, skip_special_tokens=True)


def test_remote_teacher_answers_through_a_chat_server_and_resumes_from_its_log(tmp_path, tok):
    from distillery.lm.remote import RemoteTeacher
    from distillery.lm.serve import CompletionServer

    model = llama("tiny", vocab_size=len(tok), seed=0)
    ex = reasoning.problems(5, seed=7)
    local = traces.respond(model, tok, ex, 10)
    with CompletionServer(model, tok, "teacher", quiet=True) as server:
        server.start()
        client = RemoteTeacher(server.url, "teacher", log=tmp_path / "log.jsonl")
        got = traces.respond_remote(client, ex, 10, concurrency=3)
        assert got == local and client.network_calls == 5
        again = RemoteTeacher(server.url, "teacher", log=tmp_path / "log.jsonl")
        assert traces.respond_remote(again, ex, 10, concurrency=2) == local and again.network_calls == 0


def test_on_policy_chat_rows_keep_the_prompt_and_isolate_left_padding(tok):
    model = llama("tiny", vocab_size=len(tok), seed=0)
    data = chat.token_data(tok, reasoning.problems(4, seed=8), 160)
    task = D.OnPolicy(model, lam=1.0, prompt=None, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0)
    task.check(data)
    b = task.prepare(data.batch(torch.arange(4)), epoch=0)
    assert task.generated == 1 and b["x"].shape == data.x.shape
    for r in range(4):
        first = int((data.y[r] != -100).nonzero()[0])  # the prompt is x[: first + 1]
        start = int((b["pos"][r] == 0).nonzero()[-1])  # where the row's conversation starts after its padding
        assert torch.equal(b["x"][r, start:start + first + 1], data.x[r, : first + 1])
        assert bool((b["y"][r, : start + first] == -100).all())  # prompt and padding are never trained
        alone = model(b["x"][r:r + 1, start:])
        assert torch.allclose(model(b["x"][r:r + 1], pos=b["pos"][r:r + 1])[0, start:], alone[0], atol=1e-5)
    packed = chat.token_data(tok, reasoning.problems(8, seed=8), 400, pack=True)
    with pytest.raises(DistilleryError, match="pack: false"):
        task.check(packed)


def test_cross_tokenizer_pairs_cover_the_same_text(tok):
    other = reasoning.tokenizer(reasoning.problems(200, seed=1), vocab_size=280, digits=False)
    e = reasoning.problems(1, seed=9)[0]
    _, s_train, _, s_places = chat.encode_with_places(other, e)
    _, _, _, t_places = chat.encode_with_places(tok, e)
    partner, groups = cross.pair(s_places, t_places)
    answer = e["messages"][1]["content"]
    for j, p in enumerate(s_places):
        if p is None:
            assert partner[j] is None
        elif p[1] == 0:  # answer text: the teacher token covers the student token's first character
            t = t_places[partner[j]]
            assert t[1] == 0 and t[2] <= p[2] < t[3]
        else:
            assert t_places[partner[j]][1] == 1  # end of turn to end of turn
    text = [g for g in groups if s_places[g[0]][1] == 0]
    assert "".join(answer[s_places[g[0]][2]:s_places[g[1] - 1][3]] for g in text) == answer  # the spans tile it
    for s_lo, s_hi, t_lo, t_hi in text:
        assert s_places[s_lo][2] == t_places[t_lo][2] and s_places[s_hi - 1][3] == t_places[t_hi - 1][3]
    data = cross.paired_data(other, tok, [e], 160, 160)
    assert data.settings["unpaired_tokens"] == 0
    assert int((data.y != -100).sum()) == sum(s_train[1:])


def test_gold_loss_on_batches_equals_the_per_sequence_reference(tok):
    from distillery.losses.cross_tokenizer import gold_loss, gold_span_loss

    other = reasoning.tokenizer(reasoning.problems(200, seed=1), vocab_size=280, digits=False)
    data = cross.paired_data(other, tok, reasoning.problems(3, seed=10), 160, 160)
    teacher, student = llama("tiny", vocab_size=len(tok), seed=0), llama("tiny", vocab_size=len(other), seed=1)
    b = data.batch(torch.arange(3))
    spans = cross.CrossTokenizerTeacher(teacher)(b)["spans"]
    s = student(b["x"], pos=b["pos"])
    got = gold_loss(s.reshape(-1, s.shape[-1]), spans.reshape(-1, spans.shape[-1]), b["mask"].reshape(-1),
                    targets=b["y"].reshape(-1), span_len=b["span_len"], reduction="sum")
    t_lp, s_lp = teacher(b["t_x"], pos=b["t_pos"]).log_softmax(-1), s.log_softmax(-1)
    want = 0.0
    for r in range(3):
        ends = (b["span_len"][r] > 0).nonzero().flatten().tolist()
        groups = [(t - int(b["span_len"][r, t]) + 1, t + 1, int(b["t_first"][r, t]), int(b["t_last"][r, t]) + 1)
                  for t in ends]
        want += float(gold_span_loss(s_lp[r].detach(), t_lp[r], groups, b["y"][r].clamp(min=0), b["t_y"][r].clamp(min=0),
                                     reduction="sum"))
    assert abs(float(got) - want) < 1e-3 * max(1.0, abs(want))
    got.backward()  # the student learns through every token of a span
    with pytest.raises(DistilleryError, match="chunk_size"):
        D.distil(student, cross.CrossTokenizerTeacher(teacher), data, TrainConfig(epochs=1, batch_size=3),
                 terms=[TermConfig("gold", teacher="spans")], chunk_size=4, progress=False)


def test_bad_llm_practice_input_is_one_line(teacher_run, tmp_path, capsys):
    teacher = str(teacher_run / "teacher" / "models" / "model")
    other = tmp_path / "other"
    reasoning.tokenizer(reasoning.problems(100, seed=1), vocab_size=280, digits=False).save_pretrained(str(other))
    cases = [
        (["lm/reasoning/cross", f"teacher={teacher}", f"tokenizer={other}", "terms=[{loss: kd}]"], "distil across tokenizers"),
        (["lm/reasoning/traces", "teacher=null", "data=stdlib", "seq_kd.remote.base_url=http://127.0.0.1:9/v1",
          "seq_kd.remote.model=m"], "needs chat data"),
        (["lm/reasoning/lora", f"teacher={teacher}", f"model={teacher}", "prune.keep=[0]", "lora.targets=[nope]"],
         "name no module"),
        (["lm/reasoning/on_policy", f"teacher={teacher}", "pack=true"], "pack: false"),
    ]
    for args, match in cases:
        out = tmp_path / f"bad{len(match)}"
        capsys.readouterr()
        assert main(["run", *args, *TINY, f"runs_dir={tmp_path}", "--out", str(out)]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and match in err[0], (args, err)
    with pytest.raises(DistilleryError, match=r"lora\.r must be at least 1"):
        from distillery import recipes

        recipes.load("lm/reasoning/lora", ["lora.r=0"])


def test_remote_teacher_top_k_logprobs_become_a_sparse_teacher(teacher_run, tmp_path):
    from distillery.lm.remote import RemoteTeacher
    from distillery.lm.serve import CompletionServer

    folder = teacher_run / "teacher" / "models" / "model"
    model, tok = load_lm(folder)
    ex = reasoning.problems(4, seed=11)
    with CompletionServer(model, tok, "teacher", quiet=True) as server:
        server.start()
        answers = traces.respond_remote(RemoteTeacher(server.url, "teacher"), ex, 12, top_logprobs=5)
        kept, counts = traces.keep(ex, answers, traces.verifier("none"), tok, 160)
        assert counts["kept"] == 4
        data = traces.answer_data(tok, kept, 160)
        b = data.batch(torch.arange(len(data)))
        want = model(b["x"], pos=b["pos"]).log_softmax(-1).topk(5, dim=-1)
        m = b["mask"]
        assert torch.allclose(b["top_values"][m], want.values[m], atol=1e-4)  # the server's = the model's own
        assert torch.equal(b["top_indices"][m], want.indices[m])
        assert torch.allclose(b["top_tail"][m], torch.log1p(-want.values[m].exp().sum(-1)), atol=1e-4)
        sparse = traces.AnswerTopK(len(tok))(b)["logits"]
        assert sparse.shape == (*b["x"].shape, len(tok))
        # the whole recipe with a remote teacher: answers asked once, token KD from their top-k
        out = tmp_path / "remote"
        args = ["run", "lm/reasoning/traces", *TINY, "teacher=null", f"tokenizer={folder}", "verifier=none",
                f"seq_kd.remote.base_url={server.url}", "seq_kd.remote.model=teacher", "seq_kd.top_logprobs=5",
                "terms=[{loss: ce, teacher: null}, {loss: kd}]", f"runs_dir={tmp_path}", "--out", str(out)]
        assert main(args) == 0
        row = _rows(out)[-1]
        assert row["method"] == "seq_kd" and row["terms"] == "ce, kd" and row["answers"] == 48 and row["kept"] > 0
        assert list((out / "work").glob("requests-*.jsonl"))  # the resumable request log
    with pytest.raises(DistilleryError, match="top_logprobs"):
        from distillery import recipes

        recipes.load("lm/reasoning/traces", ["teacher=null", "seq_kd.remote.base_url=http://x/v1",
                                             "seq_kd.remote.model=m", "terms=[{loss: kd}]"])


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_a_student_from_any_config_trains_on_packed_chat_rows(tmp_path, arch):
    import transformers

    tok = reasoning.tokenizer(reasoning.problems(200, seed=1), vocab_size=300)
    tok.save_pretrained(str(tmp_path / "tok"))
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256) \
        if arch == "qwen2" else transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=256, bos_token_id=None, eos_token_id=None)
    cfg.save_pretrained(str(tmp_path / "cfg"))  # a config alone: the student starts from random weights
    out = tmp_path / "run"
    assert main(["run", "lm/reasoning/sft", *TINY, f"model={tmp_path / 'cfg'}", f"tokenizer={tmp_path / 'tok'}",
                 f"runs_dir={tmp_path}", "--out", str(out)]) == 0
    model, back = load_lm(out / "models" / "model")
    assert type(model.hf).__name__.lower().startswith(arch) and back.chat_template == tok.chat_template
    assert _rows(out)[-1]["train_tokens"] > 0


def test_packing_is_refused_for_a_model_that_attends_across_sequences(tok):
    data = chat.token_data(tok, reasoning.problems(6, seed=3), 300, pack=True)
    model = llama("tiny", vocab_size=len(tok), seed=0)
    chat.check_packing(model, data)  # the real model isolates its sequences

    class Leaky(torch.nn.Module):  # a model that ignores positions: the sequences of a row see each other
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, pos=None):
            return self.inner(x)

    with pytest.raises(DistilleryError, match="pack: false"):
        chat.check_packing(Leaky(), data)


def test_review_fixes_store_on_chat_rows_cut_teacher_rows_end_tokens_and_missing_answers(tmp_path, tok, teacher_run,
                                                                                         capsys):
    from distillery.lm.models import end_ids
    from distillery.store import CachedTeacher, write_store
    from distillery.teachers import ModuleTeacher

    model = llama("tiny", vocab_size=len(tok), seed=0)
    data = chat.token_data(tok, reasoning.problems(6, seed=12), 300, pack=True)
    write_store(ModuleTeacher(model, inputs=data.inputs), data, tmp_path / "s", teacher_fingerprint="t", top_k=len(tok),
                dtype="float32")
    b = data.batch(torch.arange(len(data)))
    stored = CachedTeacher(tmp_path / "s")(b)["logits"]
    want = model(b["x"], pos=b["pos"]).log_softmax(-1)  # the packed rows as the model reads them
    got = stored.flat().dense().reshape(want.shape)
    assert torch.allclose(got, want, atol=1e-4)
    # a teacher row cut before the answer's end: the student tokens past the cut have no partner, not trained
    other = reasoning.tokenizer(reasoning.problems(200, seed=1), vocab_size=280, digits=False)
    e = reasoning.problems(1, seed=13)[0]
    full = cross.paired_data(other, tok, [e], 200, 200)
    first = chat.encode(tok, e)[1].index(True)
    cut = cross.paired_data(other, tok, [e], 200, first + 6)
    assert cut.settings["unpaired_tokens"] > 0 and int((cut.y != -100).sum()) < int((full.y != -100).sum())
    assert int(cut.extra["pair"].max()) < first + 6
    # a base tokenizer whose eos is not its template's end of turn still stops at the end of turn
    base = reasoning.tokenizer(reasoning.problems(50, seed=1), vocab_size=280)
    base.eos_token = "<|endoftext|>"
    assert base.convert_tokens_to_ids("<|im_end|>") in end_ids(base)
    # verifier exact on examples without answers: one line, not a KeyError
    plain = tmp_path / "chat.jsonl"
    plain.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                      {"role": "assistant", "content": f"{i}"}]}) + "\n"
                             for i in range(40)))
    teacher = str(teacher_run / "teacher" / "models" / "model")
    capsys.readouterr()
    assert main(["run", "lm/reasoning/traces", *TINY, f"data={plain}", f"teacher={teacher}", f"runs_dir={tmp_path}",
                 "--out", str(tmp_path / "noanswer")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "verifier: none" in err[0]
