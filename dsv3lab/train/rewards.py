"""Rule-based rewards for the generated math problems (DeepSeek-V3 §5.2.1).

"For questions that can be validated using specific rules, we adopt a rule-based reward system": a math problem with
a deterministic result is answered in a designated format, and a rule checks the answer. For dsv3lab's problems
(:mod:`dsv3lab.data.math_problems`) the designated format is the one the worked solutions use::

    prompt       "Problem: <question>\\nSolution:"
    completion   " <worked steps>\\nAnswer: <final answer>\\n"  then the end-of-sequence token

Two rules, each 0 or 1:

* **format**: the completion stopped by itself (end of sequence, not the length limit), holds exactly one line that
  starts with ``Answer:``, and that line is its last line (the completion ends right after its newline);
* **correct**: the text after the last ``Answer:`` equals the problem's answer, compared after collapsing runs of
  whitespace and stripping a final period — ``x = 9, y = 9`` matches ``x = 9,  y = 9.`` but not ``x=9``.

The reward of a completion is ``reward_correct · correct + reward_format · format`` (TrainConfig fields, 1.0 and 0.5
by default). Notebook: 13_post_training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.math_problems import MathProblem

ANSWER = "Answer:"


def normalize(answer: str) -> str:
    """Whitespace runs → one space, ends stripped, one final period dropped."""
    text = re.sub(r"\s+", " ", answer).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def extract_answer(completion: str) -> str | None:
    """The text after the last ``Answer:`` up to the end of its line, or None without one."""
    at = completion.rfind(ANSWER)
    if at < 0:
        return None
    return completion[at + len(ANSWER) :].split("\n", 1)[0]


def format_ok(completion: str, finished: bool) -> bool:
    """One ``Answer:`` line, the last one, and the completion ended by the model (``finished``), not cut off."""
    if not finished or not completion.endswith("\n"):
        return False
    lines = completion[:-1].split("\n")
    answer_lines = [i for i, line in enumerate(lines) if line.lstrip().startswith(ANSWER)]
    return answer_lines == [len(lines) - 1] and completion.count(ANSWER) == 1


def correct(completion: str, problem: MathProblem) -> bool:
    """The final answer equals the problem's (see :func:`normalize`)."""
    got = extract_answer(completion)
    return got is not None and normalize(got) == normalize(problem.answer)


@dataclass(frozen=True)
class Reward:
    correct: float  # 0 or 1
    format: float  # 0 or 1
    total: float  # reward_correct · correct + reward_format · format


def math_reward(
    completion: str, problem: MathProblem, finished: bool, reward_correct: float = 1.0, reward_format: float = 0.5
) -> Reward:
    """The rule-based reward of one completion (text after the prompt, the end-of-sequence token not included)."""
    c, f = float(correct(completion, problem)), float(format_ok(completion, finished))
    return Reward(c, f, reward_correct * c + reward_format * f)
