"""The embedded default: a character tokenizer and a synthetic arithmetic task with exactly checkable answers, a
range of difficulty, and rule-based teachers that write different correct solution styles.

The task is ``a+b=`` with operands of 1..max_digits digits. Its out-of-distribution sets, never trained on after the
base model, are the same sums in another format (``a + b =``) and another operation (sums of three one-digit
terms, ``a+b+c=``). The base model (pretrain.py) sees all three in its corpus, with bare answers, as a math base
model has seen many kinds of problem before post-training on one."""

import random
from typing import List

from dypo.data import Problem

PAD, BOS, EOS = 0, 1, 2
CHARACTERS = "0123456789+=() "


class CharTokenizer:
    """One id per character of CHARACTERS, after PAD, BOS and EOS."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def __init__(self):
        self.ids = {c: i + 3 for i, c in enumerate(CHARACTERS)}
        self.chars = {i: c for c, i in self.ids.items()}

    @property
    def vocab_size(self):
        return len(self.ids) + 3

    def encode(self, text: str) -> List[int]:
        return [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        text = []
        for token in ids:
            if token == EOS:
                break
            text.append(self.chars.get(int(token), ""))
        return "".join(text)


def _teachers(a, b):
    """Two teachers, two correct styles: the bare answer, and the sum restated in reverse order then answered."""
    total = a + b
    return [f"{total}", f"({b}+{a})={total}"]


TEACHER_STYLES = len(_teachers(0, 0))  # the rule-based teachers, each a solution style


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_problem(rng: random.Random, digits: int, spaced: bool = False) -> Problem:
    """a + b with operands of ``digits`` digits: one digit is easy to learn, three are hard; ``spaced``: written
    ``a + b =`` (an out-of-distribution format)."""
    a, b = _operand(rng, digits), _operand(rng, digits)
    return Problem(f"{a} + {b} =" if spaced else f"{a}+{b}=", str(a + b), _teachers(a, b))


def make_three_terms(rng: random.Random) -> Problem:
    """a + b + c with one-digit terms (an out-of-distribution operation); its teachers as the task's, with b + c
    as one operand."""
    a, b, c = (rng.randint(0, 9) for _ in range(3))
    return Problem(f"{a}+{b}+{c}=", str(a + b + c), _teachers(a, b + c))


def _digits(rng: random.Random, max_digits: int) -> int:
    """1..max_digits, each extra digit four times rarer: mostly learnable, some hard."""
    digits = list(range(1, max_digits + 1))
    return rng.choices(digits, weights=[4.0**-d for d in digits])[0]


def make_problems(rng: random.Random, count: int, max_digits: int, spaced: bool = False) -> List[Problem]:
    """The task's problems: operands of 1..max_digits digits, each extra digit four times rarer."""
    return [make_problem(rng, _digits(rng, max_digits), spaced) for _ in range(count)]


OOD_SETS = ("spaced", "three_terms")


def ood_problems(rng: random.Random, count: int, max_digits: int) -> dict:
    """The out-of-distribution evaluation sets: {name: problems}, ``count`` each."""
    return {"spaced": make_problems(rng, count, max_digits, spaced=True),
            "three_terms": [make_three_terms(rng) for _ in range(count)]}


def pretraining_problems(rng: random.Random, count: int, max_digits: int) -> List[Problem]:
    """The base model's corpus: the task's format, the spaced format and three-term sums, a third each."""
    makers = (lambda: make_problem(rng, _digits(rng, max_digits)),
              lambda: make_problem(rng, _digits(rng, max_digits), spaced=True), lambda: make_three_terms(rng))
    return [rng.choice(makers)() for _ in range(count)]
