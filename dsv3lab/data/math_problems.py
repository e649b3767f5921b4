"""Seeded, generated math problems with worked answers: the ``math`` domain of the built-in corpus.

DeepSeek-V3's pre-training corpus raises the share of mathematical and programming samples (§4.1). Offline, with no
data set to download, this module writes its own: one problem per document, each with a worked solution and a final
``Answer:`` line, drawn from varied templates (integer arithmetic with operator precedence, division with remainder,
fractions, percentages, linear equations, systems of two equations, quadratics with integer roots, gcd/lcm by
Euclid's algorithm, powers and roots, mean/median, and word problems: shopping, travel, work rates, ages, sharing).

Problem ``i`` of seed ``s`` depends only on ``(s, i)`` (its own ``random.Random(f"{s}:{i}")``, string seeds are hashed
with SHA-512 by CPython, so they do not depend on ``PYTHONHASHSEED``): a smaller corpus is a prefix of a larger one.
Every number is computed exactly (``fractions.Fraction``); ``tests/test_data.py`` re-derives the answers from the
question text with an independent parser.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class MathProblem:
    kind: str  # the template name, e.g. "linear" (one of KINDS)
    question: str
    solution: str  # worked steps, one per line
    answer: str  # the final answer as printed after "Answer:"

    @property
    def text(self) -> str:
        """The document: ``prompt + completion``."""
        return f"Problem: {self.question}\nSolution: {self.solution}\nAnswer: {self.answer}\n"

    @property
    def prompt(self) -> str:
        """What a model is asked in post-training (§5): the problem, up to ``Solution:``."""
        return f"Problem: {self.question}\nSolution:"

    @property
    def completion(self) -> str:
        """What it should answer: the worked solution and the final ``Answer:`` line."""
        return f" {self.solution}\nAnswer: {self.answer}\n"


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _signed(c: int, var: str = "x", first: bool = False) -> str:
    """A term of a linear expression: 3x, -x, + 2y, - 5y."""
    mag = "" if abs(c) == 1 else str(abs(c))
    if first:
        return f"{'-' if c < 0 else ''}{mag}{var}"
    return f"{'-' if c < 0 else '+'} {mag}{var}"


def _const(c: int) -> str:
    return f"+ {c}" if c >= 0 else f"- {-c}"


def _p(v: int) -> str:
    """Parenthesise a negative number inside an expression: 3 - (-4)."""
    return f"({v})" if v < 0 else str(v)


def _move(term: str, negative: bool) -> str:
    """'Subtract 3x from both sides' / 'Add 3x to both sides' for moving +term / -term."""
    return f"Add {term.lstrip('-')} to both sides" if negative else f"Subtract {term} from both sides"


# ---------------------------------------------------------------------------------------------- templates
def arithmetic(r: random.Random) -> MathProblem:
    """a op b op c with + - ×; multiplication first (operator precedence), then left to right."""
    ops = [r.choice("+-×") for _ in range(2)]
    a, b, c = (r.randint(2, 99) for _ in range(3))
    expr = f"{a} {ops[0]} {b} {ops[1]} {c}"
    apply = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y}
    steps = []
    if ops[1] == "×" and ops[0] != "×":
        bc = b * c
        steps.append(f"Multiply first: {b} × {c} = {bc}.")
        val = apply[ops[0]](a, bc)
        steps.append(f"Then {a} {ops[0]} {bc} = {val}.")
    else:
        ab = apply[ops[0]](a, b)
        steps.append(f"{'Multiply first' if ops[0] == '×' else 'Work left to right'}: {a} {ops[0]} {b} = {ab}.")
        val = apply[ops[1]](ab, c)
        steps.append(f"Then {ab} {ops[1]} {c} = {val}.")
    return MathProblem("arithmetic", f"Compute {expr}.", "\n".join(steps), str(val))


def division(r: random.Random) -> MathProblem:
    d = r.randint(3, 19)
    q, rem = r.randint(10, 500), r.randint(0, d - 1)
    n = d * q + rem
    sol = f"{d} × {q} = {d * q}, and {n} - {d * q} = {rem}.\nSo {n} = {d} × {q} + {rem}."
    return MathProblem(
        "division", f"Divide {n} by {d}. Give the quotient and the remainder.", sol, f"quotient {q}, remainder {rem}"
    )


def fractions_(r: random.Random) -> MathProblem:
    a, c = r.randint(1, 9), r.randint(1, 9)
    b, d = r.randint(2, 12), r.randint(2, 12)
    op = r.choice("+-×÷")
    x, y = Fraction(a, b), Fraction(c, d)
    q = f"Compute {a}/{b} {op} {c}/{d} and simplify."
    if op in "+-":
        den = b * d // math.gcd(b, d)
        na, nc = a * (den // b), c * (den // d)
        val = x + y if op == "+" else x - y
        raw = f"{na + nc if op == '+' else na - nc}/{den}"
        sol = f"The least common denominator of {b} and {d} is {den}.\n{a}/{b} = {na}/{den} and {c}/{d} = {nc}/{den}.\n"
        sol += f"{na}/{den} {op} {nc}/{den} = {raw}"
    elif op == "×":
        val, raw = x * y, f"{a * c}/{b * d}"
        sol = f"Multiply numerators and denominators: ({a} × {c})/({b} × {d}) = {raw}"
    else:
        val, raw = x / y, f"{a * d}/{b * c}"
        sol = f"Multiply by the reciprocal: {a}/{b} × {d}/{c} = {raw}"
    sol += "." if raw == _frac(val) else f" = {_frac(val)}."
    return MathProblem("fractions", q, sol, _frac(val))


def percent(r: random.Random) -> MathProblem:
    p = r.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
    base = r.randint(2, 60) * 20
    part = Fraction(p * base, 100)
    if r.random() < 0.5:
        sol = f"{p}% of {base} = {p}/100 × {base} = {_frac(part)}."
        return MathProblem("percent", f"What is {p}% of {base}?", sol, _frac(part))
    new = base - part
    q = f"A coat costs ${base}. It is on sale for {p}% off. What is the sale price?"
    sol = f"The discount is {p}% of {base} = {_frac(part)}.\nThe sale price is {base} - {_frac(part)} = {_frac(new)}."
    return MathProblem("discount", q, sol, f"${_frac(new)}")


def linear(r: random.Random) -> MathProblem:
    """a x + b = c x + d with an integer solution."""
    x = r.randint(-12, 12)
    a = r.choice([n for n in range(-9, 10) if n not in (0,)])
    c = r.choice([n for n in range(-5, 6) if n != a]) if r.random() < 0.5 else 0
    b = r.randint(-30, 30)
    d = (a - c) * x + b
    lhs = f"{_signed(a, first=True)} {_const(b)}"
    rhs = f"{_signed(c, first=True)} {_const(d)}" if c else str(d)
    steps = []
    if c:
        steps.append(f"{_move(_signed(c, first=True), c < 0)}: {_signed(a - c, first=True)} {_const(b)} = {d}.")
    if b:
        steps.append(f"{_move(str(b), b < 0)}: {_signed(a - c, first=True)} = {d - b}.")
    if a - c != 1:
        steps.append(f"Divide both sides by {a - c}: x = {x}.")
    return MathProblem("linear", f"Solve for x: {lhs} = {rhs}.", "\n".join(steps), f"x = {x}")


def system(r: random.Random) -> MathProblem:
    """Two equations in x and y with integer solutions, solved by elimination of y."""
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    while True:
        a1, b1, a2, b2 = (r.choice([n for n in range(-6, 7) if n]) for _ in range(4))
        if a1 * b2 - a2 * b1:
            break
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    e1 = f"{_signed(a1, first=True)} {_signed(b1, 'y')} = {c1}"
    e2 = f"{_signed(a2, first=True)} {_signed(b2, 'y')} = {c2}"
    det = a1 * b2 - a2 * b1
    sol = (
        f"Multiply the first equation by {b2} and the second by {b1}, then subtract to eliminate y:\n"
        f"({a1 * b2} - {_p(a2 * b1)})x = {c1 * b2} - {_p(c2 * b1)}, so {det}x = {c1 * b2 - c2 * b1} and x = {x}.\n"
        f"Substitute into the first equation: {_signed(b1, 'y', first=True)} = {c1} - {_p(a1 * x)} = "
        f"{c1 - a1 * x}, so y = {y}."
    )
    return MathProblem("system", f"Solve the system: {e1} and {e2}.", sol, f"x = {x}, y = {y}")


def quadratic(r: random.Random) -> MathProblem:
    p, q = sorted((r.randint(-10, 10), r.randint(-10, 10)))
    b, c = -(p + q), p * q
    eq = f"x^2 {_signed(b) if b else ''} {_const(c) if c else ''}".replace("  ", " ").strip() + " = 0"
    fp, fq = (f"(x {_const(-v)})" if v else "x" for v in (p, q))
    factored = "x^2" if p == q == 0 else ("x" + fp if fq == "x" else fp + fq)
    sol = f"Look for two numbers with product {c} and sum {-b}: {p} and {q}.\nSo {factored} = 0."
    ans = f"x = {p}" if p == q else f"x = {p} or x = {q}"
    return MathProblem("quadratic", f"Solve {eq}.", sol, ans)


def gcd_lcm(r: random.Random) -> MathProblem:
    g = r.randint(2, 15)
    a, b = g * r.randint(2, 30), g * r.randint(2, 30)
    while a == b:
        b = g * r.randint(2, 30)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    lcm = a * b // x
    sol = "By Euclid's algorithm:\n" + "\n".join(steps) + f"\nSo gcd = {x}, and lcm = {a} × {b} / {x} = {lcm}."
    return MathProblem(
        "gcd_lcm",
        f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
        sol,
        f"gcd {x}, lcm {lcm}",
    )


def powers(r: random.Random) -> MathProblem:
    if r.random() < 0.5:
        b, e = r.randint(2, 9), r.randint(2, 6)
        acc, steps = b, [str(b)]
        for _ in range(e - 1):
            acc *= b
            steps.append(str(acc))
        return MathProblem("power", f"Compute {b}^{e}.", "Multiply repeatedly: " + ", ".join(steps) + ".", str(acc))
    n = r.randint(2, 40)
    return MathProblem(
        "sqrt", f"What is the square root of {n * n}?", f"{n} × {n} = {n * n}, so the root is {n}.", str(n)
    )


def statistics_(r: random.Random) -> MathProblem:
    xs = [r.randint(1, 50) for _ in range(r.choice([5, 6, 7]))]
    s, srt = sum(xs), sorted(xs)
    mean = Fraction(s, len(xs))
    k = len(xs) // 2
    med = Fraction(srt[k]) if len(xs) % 2 else Fraction(srt[k - 1] + srt[k], 2)
    mean_steps = f"{s}/{len(xs)}" + ("" if mean.denominator == len(xs) else f" = {_frac(mean)}")
    sol = (
        f"The sum is {s} and there are {len(xs)} numbers, so the mean is {mean_steps}.\n"
        f"Sorted: {', '.join(map(str, srt))}, so the median is {_frac(med)}."
    )
    return MathProblem(
        "mean_median",
        f"Find the mean and the median of {', '.join(map(str, xs))}.",
        sol,
        f"mean {_frac(mean)}, median {_frac(med)}",
    )


_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Maya", "Nils"]
_ITEMS = [
    ("pencil", "pencils"),
    ("apple", "apples"),
    ("notebook", "notebooks"),
    ("ticket", "tickets"),
    ("book", "books"),
    ("mug", "mugs"),
]


def word_problem(r: random.Random) -> MathProblem:
    name, other = r.sample(_NAMES, 2)
    kind = r.choice(["shopping", "travel", "work", "ages", "sharing"])
    if kind == "shopping":
        item, items = r.choice(_ITEMS)
        n, price = r.randint(2, 12), r.randint(1, 15)
        paid = ((n * price) // 10 + 1) * 10
        q = f"{name} buys {n} {items} at ${price} each and pays with ${paid}. How much change does {name} get?"
        sol = (
            f"The {items} cost {n} × {price} = {n * price} dollars.\nThe change is {paid} - {n * price} = "
            f"{paid - n * price} dollars."
        )
        return MathProblem("word_shopping", q, sol, f"${paid - n * price}")
    if kind == "travel":
        speed, hours = r.randint(3, 24) * 5, r.randint(2, 9)
        q = f"A train travels at {speed} km/h for {hours} hours. How far does it go?"
        sol = f"distance = speed × time = {speed} × {hours} = {speed * hours} km."
        return MathProblem("word_travel", q, sol, f"{speed * hours} km")
    if kind == "work":
        a, b = r.choice([(2, 3), (3, 6), (4, 12), (6, 3), (5, 20), (10, 15), (12, 4), (2, 6)])
        t, rate = Fraction(a * b, a + b), _frac(Fraction(1, a) + Fraction(1, b))  # together: 1/t = 1/a + 1/b
        q = f"{name} can paint a fence in {a} hours and {other} in {b} hours. How long do they take together?"
        per_hour = f"Together they paint 1/{a} + 1/{b} = {rate} of the fence per hour.\n"
        sol = per_hour + f"So the time is 1 ÷ ({rate}) = {_frac(t)} hours."
        return MathProblem("word_work", q, sol, f"{_frac(t)} hours")
    if kind == "ages":
        young, k, later = r.randint(3, 15), r.randint(2, 4), r.randint(2, 10)
        old = k * young
        total = young + old + 2 * later
        q = (
            f"{name} is {k} times as old as {other}. In {later} years their ages will add up to {total}. "
            f"How old is {other} now?"
        )
        sol = (
            f"Let {other}'s age be a. Then {name} is {k}a, and in {later} years: "
            f"(a + {later}) + ({k}a + {later}) = {total}.\n"
            f"So {k + 1}a + {2 * later} = {total}, {k + 1}a = {total - 2 * later}, a = {young}."
        )
        return MathProblem("word_ages", q, sol, str(young))
    p, qq = r.randint(1, 5), r.randint(1, 5)
    unit = r.randint(2, 20)
    total = (p + qq) * unit
    q = f"{name} and {other} share {total} marbles in the ratio {p}:{qq}. How many does {name} get?"
    sol = (
        f"There are {p} + {qq} = {p + qq} parts, each worth {total} / {p + qq} = {unit}.\n"
        f"{name} gets {p} × {unit} = {p * unit}."
    )
    return MathProblem("word_sharing", q, sol, str(p * unit))


TEMPLATES: dict[str, Callable[[random.Random], MathProblem]] = {
    "arithmetic": arithmetic,
    "division": division,
    "fractions": fractions_,
    "percent": percent,
    "linear": linear,
    "system": system,
    "quadratic": quadratic,
    "gcd_lcm": gcd_lcm,
    "powers": powers,
    "statistics": statistics_,
    "word": word_problem,
}


# every MathProblem.kind the templates produce (word problems and powers have several)
KINDS = (
    "arithmetic",
    "division",
    "fractions",
    "percent",
    "discount",
    "linear",
    "system",
    "quadratic",
    "gcd_lcm",
    "power",
    "sqrt",
    "mean_median",
    "word_shopping",
    "word_travel",
    "word_work",
    "word_ages",
    "word_sharing",
)


def math_problem(seed: int, index: int) -> MathProblem:
    """Problem ``index`` of ``seed``: a template drawn uniformly, then its numbers (a pure function of both)."""
    r = random.Random(f"{seed}:{index}")
    return TEMPLATES[r.choice(sorted(TEMPLATES))](r)


def math_problems(seed: int = 0) -> Iterator[MathProblem]:
    """Endless stream of problems 0, 1, 2 … for ``seed``."""
    i = 0
    while True:
        yield math_problem(seed, i)
        i += 1
