"""Generate the arithmetic task set (train.jsonl, eval.jsonl): short questions with one checkable answer.

Usage: python data/arithmetic/make.py data/arithmetic
Deterministic (seed 0). Tasks: two-digit addition and subtraction, and
multiplication of one-digit by two-digit numbers, asked in a few phrasings;
the reply is the bare number, so exact match checks it. The held-out questions
share no (operation, operands) with the training ones.
"""

import json
import os
import random
import sys

PHRASES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}. Reply with the number only."]


def make(rng: random.Random) -> tuple[tuple, dict]:
    kind = rng.choice(["+", "-", "*"])
    if kind == "*":
        a, b = rng.randint(2, 9), rng.randint(11, 99)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = {"+": a + b, "-": a - b, "*": a * b}[kind]
    prompt = rng.choice(PHRASES).format(a=a, op={"+": "+", "-": "-", "*": "x"}[kind], b=b)
    return (kind, a, b), {"prompt": prompt, "response": str(answer), "answer": answer}


def main(folder: str, n_train: int = 1000, n_eval: int = 200) -> None:
    rng, seen = random.Random(0), set()
    rows = []
    while len(rows) < n_train + n_eval:
        key, row = make(rng)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    for name, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main(sys.argv[1])
