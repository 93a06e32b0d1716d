"""The embedded default: a character tokenizer and a synthetic arithmetic task with exactly checkable answers, a
range of difficulty, and rule-based teachers that write different correct solution styles."""

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


def make_problem(rng: random.Random, digits: int) -> Problem:
    """a + b with operands of ``digits`` digits: one digit is easy to learn, three are hard."""
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    return Problem(f"{a}+{b}=", str(a + b), _teachers(a, b))


def make_problems(rng: random.Random, count: int, max_digits: int) -> List[Problem]:
    """Operands of 1..max_digits digits, each extra digit four times rarer: mostly learnable, some hard."""
    digits = list(range(1, max_digits + 1))
    return [make_problem(rng, rng.choices(digits, weights=[4.0**-d for d in digits])[0]) for _ in range(count)]
