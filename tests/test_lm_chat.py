"""Chat data: assistant masks against a hand-tokenised conversation, packing without attention across
conversations, left-padded generation, the built-in reasoning task, and bad chat input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from distillery.errors import DistilleryError
from distillery.lm import chat, reasoning
from distillery.lm.generate import sample
from distillery.lm.models import llama, load_tokenizer, save_lm

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return reasoning.tokenizer(reasoning.problems(300, seed=1), vocab_size=400)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ana has 3 pens."},
        {"role": "assistant", "content": "3 + 4 = 7."}, {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "The answer is 7."}]


def test_assistant_mask_matches_a_hand_tokenised_conversation(tok):
    ids, train, cut = chat.encode(tok, {"messages": CONV})
    # by hand: the ChatML text cut at every turn; each piece starts at a special token, so the pieces
    # tokenise on their own exactly as inside the whole text
    pieces = [("<|im_start|>system\nBe brief.<|im_end|>\n", False), ("<|im_start|>user\nAna has 3 pens.<|im_end|>\n", False),
              ("<|im_start|>assistant\n", False), ("3 + 4 = 7.<|im_end|>", True), ("\n", False),
              ("<|im_start|>user\nAnd now?<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
              ("The answer is 7.<|im_end|>", True), ("\n", False)]
    want_ids, want_train = [], []
    for text, trained in pieces:
        p = ids_of(tok, text)
        want_ids += p
        want_train += [trained] * len(p)
    assert ids == want_ids and train == want_train and not cut
    assert tok.convert_ids_to_tokens(ids)[train.index(True)] == "3"  # the first trained token is the answer's
    assert tok.eos_token == "<|im_end|>" and ids[-2] == tok.eos_token_id and train[-2] and not train[-1]  # the end
    # of turn is trained, the newline after it is not


def test_plain_prompt_completion_trains_the_completion_and_the_end_token(tok):
    ids, train, _ = chat.encode(tok, {"prompt": "2 + 2 =", "completion": " 4"})
    p, c = ids_of(tok, "2 + 2 ="), ids_of(tok, " 4")
    assert ids == p + c + [tok.eos_token_id]
    assert train == [False] * len(p) + [True] * (len(c) + 1)
    # conversational prompt / completion is the same as messages
    conv = {"prompt": CONV[:2], "completion": [CONV[2]]}
    assert chat.encode(tok, conv)[:2] == chat.encode(tok, {"messages": CONV[:3]})[:2]


def test_rows_targets_and_positions(tok):
    a, b = ([5, 6, 7, 8], [False, False, True, True]), ([9, 10, 11], [False, True, True])
    x, y, pos = chat.rows([a, b], block=8, pad=0, pack=True)
    assert x.tolist() == [[5, 6, 7, 9, 10, 0, 0, 0]]
    # pairs: a gives (5->6 no, 6->7 yes, 7->8 yes), b gives (9->10 yes, 10->11 yes); padding never trained
    assert y.tolist() == [[-100, 7, 8, 10, 11, -100, -100, -100]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    x, y, pos = chat.rows([a, b], block=8, pad=0, pack=False)
    assert x.shape == (2, 3) and pos.tolist() == [[0, 1, 2], [0, 1, 0]] and y[1].tolist() == [10, 11, -100]
    with pytest.raises(DistilleryError, match="does not fit"):
        chat.rows([a], block=2, pad=0)


def test_packed_rows_do_not_attend_across_conversations(tok):
    examples = reasoning.problems(6, seed=3)
    packed = chat.token_data(tok, examples, block=256, pack=True)
    alone = chat.token_data(tok, examples, block=256, pack=False)
    assert len(packed) < len(alone)
    assert int(packed.batch(torch.arange(len(packed)))["mask"].sum()) == int(alone.batch(torch.arange(len(alone)))["mask"].sum())
    model = llama("tiny", vocab_size=len(tok), seed=0)
    b = packed.batch(torch.arange(len(packed)))
    out = model(b["x"], pos=b["pos"])
    lengths = [int((alone.x[i] != tok.pad_token_id).sum()) for i in range(len(alone))]
    found = 0
    for r in range(len(packed)):  # every conversation inside a packed row: its logits as when alone
        starts = [*(packed.pos[r] == 0).nonzero().flatten().tolist(), packed.x.shape[1]]
        for lo, hi in itertools.pairwise(starts):
            match = [i for i in range(len(alone)) if lengths[i] == hi - lo and torch.equal(alone.x[i, :hi - lo], packed.x[r, lo:hi])]
            if not match:
                assert bool((packed.y[r, lo:hi] == -100).all())  # the padding at a row's end
                continue
            single = model(alone.x[match[0]:match[0] + 1, : hi - lo])
            assert torch.allclose(out[r, lo:hi], single[0], atol=1e-5)
            found += 1
    assert found == len(examples)
    # without positions the second conversation of a row does see the first: the test can fail
    leaked = model(b["x"])
    assert not torch.allclose(leaked, out, atol=1e-5)


def test_left_padded_generation_equals_one_prompt_at_a_time(tok):
    model = llama("tiny", vocab_size=len(tok), seed=0)
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])
    ga = sample(model, a, 5, temperature=0).ids[0, 5:]
    gb = sample(model, b, 5, temperature=0).ids[0, 2:]
    prompts = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :3] = False
    g = sample(model, prompts, 5, temperature=0, prompt_mask=mask).ids[:, 5:]
    assert torch.equal(g[0], ga) and torch.equal(g[1], gb)
    with pytest.raises(DistilleryError, match="left padding"):
        sample(model, prompts, 2, prompt_mask=mask.flip(1))


def test_reasoning_task_answers_and_verifier():
    s = reasoning.splits(50, 10, 10, seed=0)
    qs = [e["messages"][0]["content"] for part in s.values() for e in part]
    assert len(qs) == len(set(qs)) == 70
    for e in s["train"]:
        sol = e["messages"][1]["content"]
        assert reasoning.verify(e, sol)  # the gold solution passes its own verifier
        for eq in sol.split(". ")[:-1]:  # every step's arithmetic is right
            left, right = eq.replace("We get ", "").replace("So ", "").replace(" is ", " = ").split(" = ")
            assert eval(left, {}) == int(right.rstrip("."))
    assert reasoning.extract_answer("5 + 2 = 7. The answer is 7. no, the answer is 8.") == "8"
    assert reasoning.extract_answer("no number") is None
    assert not reasoning.verify({"answer": "7"}, "The answer is 70.")


def test_chat_files_jsonl_and_hf_datasets(tmp_path, tok):
    rows = reasoning.problems(4, seed=2)
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert chat.is_chat_file(f) and chat.read_examples(f) == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]).save_to_disk(
        str(tmp_path / "ds"))
    assert chat.is_chat_file(tmp_path / "ds")
    assert chat.read_examples(tmp_path / "ds")[1] == {"prompt": "c", "completion": "d"}
    (tmp_path / "plain.jsonl").write_text('{"text": "hello"}\n')
    assert not chat.is_chat_file(tmp_path / "plain.jsonl")


def test_tokenizer_files_and_chat_template_survive_save(tmp_path, tok):
    model = llama("tiny", vocab_size=len(tok), seed=0)
    save_lm(model, tok, tmp_path / "m")
    back = load_tokenizer(tmp_path / "m")
    assert back.chat_template == tok.chat_template and back.eos_token == "<|im_end|>" and back.pad_token == "<|endoftext|>"
    assert chat.encode(back, {"messages": CONV}) == chat.encode(tok, {"messages": CONV})
    meta = json.loads((tmp_path / "m" / "distillery_lm.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(meta["files"])


@pytest.mark.parametrize("example, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": []}, "non-empty list"),
    ({"text": "plain"}, "neither 'messages' nor 'prompt'"),
    ({"prompt": "a", "completion": ""}, "completion is empty"),
])
def test_bad_examples_are_one_line_errors(tok, example, match):
    with pytest.raises(DistilleryError, match=match) as e:
        chat.encode(tok, example)
    assert "\n" not in str(e.value)


def test_missing_template_long_prompt_and_unstable_template(tok):
    from distillery.lm.corpus import train_tokenizer

    plain = train_tokenizer(["some text to learn"] * 5, vocab_size=300)
    with pytest.raises(DistilleryError, match="no chat template"):
        chat.encode(plain, {"messages": CONV})
    long = {"messages": [{"role": "user", "content": "1 2 3 4 5 6 7 8 9 " * 20}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DistilleryError, match=r"the prompt has \d+ tokens, the context 32"):
        chat.encode(tok, long, max_tokens=32)
    ids, _train, cut = chat.encode(tok, {"messages": CONV}, max_tokens=45)  # an answer cut short is kept, and said
    assert cut and len(ids) == 45
    odd = reasoning.tokenizer(reasoning.problems(50), vocab_size=300)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(DistilleryError, match="prefix by prefix"):
        chat.encode(odd, {"messages": CONV})
