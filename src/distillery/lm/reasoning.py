"""A built-in reasoning task that runs on a CPU: arithmetic word problems with worked solutions.

``problems(n, seed)`` generates chat examples::

    {"messages": [{"role": "user", "content": "Ana has 12 apples. She buys 3 bags with 4 apples each. ..."},
                  {"role": "assistant", "content": "3 * 4 = 12. 12 + 12 = 24. ... The answer is 19."}],
     "answer": "19"}

Each problem chains one to three operations (+, -, *) over small numbers (every intermediate result
in [0, 200)); the gold solution writes one equation per step (chain of thought), then ``The answer
is N.`` The gold solutions are written in several styles (the operands of + and * in either order,
three phrasings of a step), as human-written solutions vary: a teacher's greedy traces are one
style, which is what sequence-level distillation hands a small student (Kim & Rush 2016).

``extract_answer(text)`` reads the final answer (the number after the last ``answer is``);
``verify(example, response)`` is exact match with ``example["answer"]``, the verifier of the
sequence-level distillation filter (``distillery.lm.traces``).

``tokenizer(examples, vocab_size)``: ``chat.train_tokenizer`` on the problems: a byte-level BPE
with digits split one by one, ChatML's special tokens and template.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any

NAMES = ("Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles", "eggs", "plums")
_ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


def _step(rng: random.Random, op: str, a: int, b: int) -> str:
    """One equation of a worked solution, in one of the gold styles."""
    r = {"+": a + b, "-": a - b, "*": a * b}[op]
    if op in "+*" and rng.random() < 0.5:
        a, b = b, a
    style = rng.randrange(3)
    if style == 0:
        return f"{a} {op} {b} = {r}."
    if style == 1:
        return f"We get {a} {op} {b} = {r}."
    return f"So {a} {op} {b} is {r}."


def problem(rng: random.Random, steps: int = 3, largest: int = 200) -> dict[str, Any]:
    """One word problem of 1 to ``steps`` events (finding, giving away, buying bags: a product and a sum)
    whose every count stays below ``largest``, with its gold solution and answer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, max(2, min(30, largest // 4)))
    text = [f"{name} has {total} {item}."]
    lines: list[str] = []
    side = max(2, min(9, math.isqrt(largest // 2)))
    for _ in range(rng.randint(1, steps)):
        kind = rng.choice(("buy", "give", "bags"))
        if kind == "bags":
            bags, each = rng.randint(2, side), rng.randint(2, side)
            if total + bags * each >= largest:
                kind = "give"
            else:
                text.append(f"{name} buys {bags} bags with {each} {item} each.")
                lines.append(_step(rng, "*", bags, each))
                lines.append(_step(rng, "+", total, bags * each))
                total += bags * each
                continue
        more = rng.randint(2, max(2, min(19, largest // 5)))
        if kind == "buy" and total + more < largest:
            text.append(f"{name} finds {more} more {item}.")
            lines.append(_step(rng, "+", total, more))
            total += more
        else:
            less = rng.randint(1, max(1, total - 1))
            text.append(f"{name} gives {less} {item} away.")
            lines.append(_step(rng, "-", total, less))
            total -= less
    question = " ".join(text) + f" How many {item} does {name} have now?"
    solution = " ".join(lines) + f" The answer is {total}."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": solution}],
            "answer": str(total)}


def problems(n: int, seed: int = 0, steps: int = 3, largest: int = 200) -> list[dict[str, Any]]:
    """``n`` problems drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [problem(rng, steps, largest) for _ in range(int(n))]


def splits(train: int = 8000, validation: int = 200, test: int = 500, seed: int = 0, steps: int = 3,
           largest: int = 200) -> dict[str, list[dict]]:
    """Train / validation / test problems; no question of one split appears in another."""
    out: dict[str, list[dict]] = {}
    seen: set[str] = set()
    rng = random.Random(seed)
    for name, n in (("test", test), ("validation", validation), ("train", train)):
        rows: list[dict] = []
        while len(rows) < n:
            p = problem(rng, steps, largest)
            q = p["messages"][0]["content"]
            if q not in seen:
                seen.add(q)
                rows.append(p)
        out[name] = rows
    return out


def extract_answer(text: str) -> str | None:
    """The number after the last ``answer is`` in ``text`` (None when there is none)."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


def verify(example: dict[str, Any], response: str) -> bool:
    """Exact match of the response's final answer with the example's ``answer``."""
    return extract_answer(response) == str(example["answer"])


def tokenizer(examples: Sequence[dict[str, Any]], vocab_size: int = 512, digits: bool = True):
    """The task's chat tokenizer (``chat.train_tokenizer``: ChatML, digits split) trained on ``examples``."""
    from .chat import train_tokenizer

    return train_tokenizer(examples, vocab_size, digits)
