"""Estimate questions as templates: the inputs change every time, the learner types a
number, and the number is checked against the formula within a stated tolerance.

A bank entry of kind `estimate` carries `value` (the book's answer, for the first choice of
every input) and a `template`:

    template:
      prompt: "How many bytes of KV cache does {m.label} need per token at {nbytes} bytes per number?"
      inputs: {model: [smollm2-135m, llama-3.1-8b], nbytes: [2, 1, 4]}
      formula: "2 * m.n_layers * m.n_kv_heads * m.head_dim * nbytes"
      unit: bytes
      tolerance: 0.05
      steps: "2 (K and V) x {m.n_layers} layers x ... = {answer:,.0f} bytes"
      mistakes:
        - {name: "K and V counted once", formula: "m.n_layers * m.n_kv_heads * m.head_dim * nbytes"}

The input `model` picks a published configuration (`m` in formulas, `catalog.MODELS`) and
`gpu` a published accelerator (`g`, `catalog.GPUS`); every other input is a number.
Example: inputs {model: smollm2-135m, nbytes: 2} -> answer 23,040 bytes; typing 11,520
names the mistake "K and V counted once".
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from itertools import product

from .catalog import GPUS, MODELS

TEMPLATE_FIELDS = {"prompt", "inputs", "formula", "unit", "tolerance", "steps", "mistakes"}
# Formulas are repository data, evaluated with these names only (no builtins).
FUNCTIONS = {"ceil": math.ceil, "floor": math.floor, "log2": math.log2, "sqrt": math.sqrt,
             "min": min, "max": max, "round": round, "abs": abs}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class TemplateError(ValueError):
    """A template that cannot be used; the message names what is wrong."""


@dataclass
class Estimate:
    """One drawn instance of a template."""

    question_id: str
    prompt: str
    answer: float
    unit: str
    tolerance: float  # relative
    steps: str
    mistakes: list[tuple[str, float]]  # (name, the number that mistake gives)
    inputs: dict

    def judge(self, number: float) -> "Verdict":
        """Right within the tolerance; else the mistakes the number matches, the closest first
        (two mistakes can give nearly the same number for some inputs: both are named)."""
        ok = close(number, self.answer, self.tolerance)
        matches = sorted((abs(number - wrong) / abs(wrong) if wrong else abs(number), name)
                         for name, wrong in self.mistakes if close(number, wrong, self.tolerance))
        names = list(dict.fromkeys(name for _, name in matches))
        mistake = None if ok or not names else names[0] + "".join(f" (or: {n})" for n in names[1:])
        return Verdict(ok, abs(number - self.answer) / abs(self.answer) if self.answer else abs(number), mistake)


@dataclass
class Verdict:
    correct: bool
    relative_error: float
    mistake: str | None  # the common mistake the number matches, when it does


def close(number: float, target: float, tolerance: float) -> bool:
    if target == 0:
        return abs(number) <= tolerance
    return abs(number - target) <= tolerance * abs(target)


def namespace(inputs: dict) -> dict:
    """The names a formula or text sees: each input, `m` and `g` for a model and a GPU."""
    names = dict(FUNCTIONS)
    for key, value in inputs.items():
        names[key] = value
        if key == "model":
            names["m"] = MODELS[value]
        elif key == "gpu":
            names["g"] = GPUS[value]
    return names


def evaluate(formula: str, inputs: dict) -> float:
    return eval(formula, {"__builtins__": {}}, namespace(inputs))  # repository data, see FUNCTIONS


SINGULAR = re.compile(r"(?<![\d.,])1 (byte|bit|token|layer|block|sequence|request|step)s\b")


def render(text: str, inputs: dict, answer: float | None = None) -> str:
    """The text with the inputs filled in; '1 bytes' becomes '1 byte'."""
    names = namespace(inputs)
    if answer is not None:
        names["answer"] = answer
    return SINGULAR.sub(r"1 \1", text.format(**names))


def default_inputs(template: dict) -> dict:
    """The first choice of every input: the question as the book asks it."""
    return {key: choices[0] for key, choices in template["inputs"].items()}


def draw(question: dict, rng: random.Random, fresh: bool = True) -> Estimate:
    """An instance of the question's template: fresh inputs (at least one differing from the
    book's question where possible), or the book's own with fresh=False."""
    template = question["template"]
    inputs = default_inputs(template)
    if fresh:
        choices = list(product(*template["inputs"].values()))
        others = [c for c in choices if list(c) != list(inputs.values())] or choices
        inputs = dict(zip(template["inputs"], rng.choice(others)))
    return instance(question, inputs)


def instance(question: dict, inputs: dict) -> Estimate:
    template = question["template"]
    answer = evaluate(template["formula"], inputs)
    mistakes = [(m["name"], evaluate(m["formula"], inputs)) for m in template.get("mistakes", [])]
    return Estimate(str(question["id"]), render(template["prompt"], inputs), answer, template["unit"],
                    float(template["tolerance"]), render(template["steps"], inputs, answer), mistakes, inputs)


def check_template(question: dict) -> str | None:
    """What is wrong with an estimate entry's template, or None. Every combination of inputs
    is evaluated and rendered, so a learner never draws one that breaks."""
    template = question.get("template")
    if not isinstance(template, dict):
        return "estimate questions carry a template (prompt, inputs, formula, unit, tolerance, steps)"
    missing = {"prompt", "inputs", "formula", "unit", "tolerance", "steps"} - set(template)
    if missing:
        return f"the template lacks {', '.join(sorted(missing))}"
    if set(template) - TEMPLATE_FIELDS:
        return f"the template has unknown fields {', '.join(sorted(set(template) - TEMPLATE_FIELDS))}"
    inputs = template["inputs"]
    if not isinstance(inputs, dict) or not inputs:
        return "template inputs must be a mapping of name -> list of choices"
    for key, choices in inputs.items():
        if not NAME.match(str(key)) or key in FUNCTIONS or key in ("m", "g", "answer"):
            return f"template input name {key!r} is not allowed"
        if not isinstance(choices, list) or not choices:
            return f"template input {key} needs a non-empty list of choices"
        table = MODELS if key == "model" else GPUS if key == "gpu" else None
        for choice in choices:
            if table is not None and choice not in table:
                return f"template input {key}: {choice!r} is not one of {', '.join(table)}"
            if table is None and (isinstance(choice, bool) or not isinstance(choice, (int, float))):
                return f"template input {key}: {choice!r} is not a number"
    if not isinstance(template["tolerance"], (int, float)) or not 0 < template["tolerance"] <= 0.5:
        return "template tolerance is a relative error in (0, 0.5], for example 0.05"
    mistakes = template.get("mistakes", [])
    if not isinstance(mistakes, list) or any(not isinstance(m, dict) or set(m) != {"name", "formula"}
                                             for m in mistakes):
        return "template mistakes are a list of {name, formula}"
    if len(list(product(*inputs.values()))) < 2:
        return "the template must have at least two combinations of inputs (fresh numbers)"
    for combo in product(*inputs.values()):
        drawn = dict(zip(inputs, combo))
        try:
            est = instance(question, drawn)
        except Exception as err:  # noqa: BLE001 - reported with the inputs that broke it
            return f"the template fails for inputs {drawn}: {type(err).__name__}: {err}"
        if not isinstance(est.answer, (int, float)) or not math.isfinite(est.answer) or est.answer <= 0:
            return f"the formula gives {est.answer!r} for inputs {drawn}; it must be a positive number"
        for name, wrong in est.mistakes:
            if close(wrong, est.answer, est.tolerance):
                return f"mistake {name!r} gives the right answer for inputs {drawn}; it could never be named"
    value = evaluate(template["formula"], default_inputs(template))
    if "value" not in question or not math.isclose(value, question["value"], rel_tol=1e-9):
        return f"the formula gives {value} for the first choice of every input; value says {question.get('value')}"
    return None


UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "thousand": 1e3, "million": 1e6,
         "billion": 1e9, "%": 0.01}
NUMBER = re.compile(r"^\s*([-+]?(?:\d[\d,_]*\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([a-z% /-]*?)\s*$", re.IGNORECASE)


def parse_number(text: str, unit: str = "") -> float:
    """A typed answer as a number: '23040', '23,040', '2.3e4', '22.5 KiB', '1.2 GB', '3 million'.
    The question's unit after it ('bytes', '3 million tokens') is allowed. Raises ValueError
    naming what was typed and what is accepted."""
    match = NUMBER.match(text)
    suffix = match.group(2).lower().replace(" ", "") if match else None
    units = {**UNITS, "%": 1, "percent": 1} if unit.lower() in ("%", "percent") else dict(UNITS)  # '25%' of a percentage is 25
    if unit.lower() not in ("bytes", "byte"):
        units["b"] = 1e9  # '8B parameters' is 8 billion; only a number of bytes reads B as bytes
    if suffix in ("m", "mb") and unit.lower() in ("ms", "s", "seconds", "minutes", "min"):
        raise ValueError(f"{text.strip()!r} is ambiguous for a time in {unit} (million? minutes?); type the number "
                         f"of {unit}, for example 5 or 5 {unit}")
    if suffix is not None and suffix not in units:
        for word in sorted({unit.lower().replace(" ", ""), unit.lower().rstrip("s"), "bytes", "byte", "b"} - {""},
                           key=len, reverse=True):
            if suffix.endswith(word) and suffix[: -len(word)] in units:
                suffix = suffix[: -len(word)]
                break
    if suffix not in units:
        raise ValueError(f"{text.strip()!r} is not a number; type digits, for example 23040, 23,040, 2.3e4, "
                         f"22.5 KiB, 1.2 GB or 3 million")
    return float(match.group(1).replace(",", "").replace("_", "")) * units[suffix]
