"""The convention a user declares for a loss (``--inputs``, ``--takes``, ``--expect``, ``--masked-vocab``,
``--temperature``): what it takes and what it must return, parsed and checked; bad input is a ``UsageError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from klparity.diagnose.records import api_reduction_name
from klparity.numerics import oracle

LossFn = Callable[..., Any]

TAKES: Final = ("logits", "probs", "log_probs")
#: ``--expect`` reductions: name -> what the loss must divide the sum of per-row KLs by.
REDUCTIONS: Final[dict[str, str]] = {
    "mean": "the mean over all rows (B for (B, C), B·S for (B, S, C))",
    "batch": f"the sum over all rows divided by the batch size B = shape[0] ({api_reduction_name('batch')})",
    "sum": "the sum over all rows",
    "per-token": "no reduction: one value per row, shape (B,) or (B, S)",
}
#: The same, short (the expected value in words).
_REDUCTION_WORDS: Final = {"mean": "mean over rows", "batch": "sum over rows / B", "sum": "sum over rows",
                           "per-token": "per-row"}  # fmt: skip
DEFAULT_INPUTS: Final = "student_logits,teacher_logits,temperature"
DEFAULT_EXPECT: Final = "mean,t2"
DEFAULT_DTYPES: Final = ("float32", "float64")
#: Formulas the convention may declare (``--expect``): the forward KL, the reverse KL and a ``jsd:BETA``.
DECLARABLE: Final = ("exact", "swapped")


class UsageError(ValueError):
    """Bad input from the user (target, convention, signature): reported in one line, exit status 2."""


def jsd_beta(formula: str) -> float | None:
    """The beta of a ``jsd:BETA`` formula name, None for any other formula."""
    return float(formula.removeprefix("jsd:")) if formula.startswith("jsd:") else None


def jsd_name(beta: float, digits: int = 10) -> str:
    """The formula name of the generalized JSD with weight ``beta`` on the teacher."""
    return f"jsd:{beta:.{digits}g}"


def declarable_words(formula: str) -> str | None:
    """What a declarable formula (forward KL, reverse KL, ``jsd:BETA``) computes, in words; None for others."""
    beta = jsd_beta(formula)
    if beta is not None:
        return (f"generalized JSD with beta {beta:.6g}: β·KL(teacher‖m) + (1−β)·KL(student‖m), "
                "m = β·teacher + (1−β)·student")  # fmt: skip
    return {"exact": "KL(teacher‖student)", "swapped": "KL(student‖teacher)"}.get(formula)


def _role(name: str) -> str:
    n = name.strip().lower()
    if n.startswith("student"):
        return "student"
    if n.startswith("teacher"):
        return "teacher"
    if n in ("temperature", "temp", "tau", "t"):
        return "temperature"
    raise UsageError(f"unknown input {name!r} in --inputs: name each argument student_*, teacher_* or temperature")


@dataclass(frozen=True)
class Convention:
    """What the user's loss takes and what it must return.

    ``inputs``: the roles of its positional arguments, in order (``student``, ``teacher``,
    ``temperature``); ``takes``: what student and teacher are (``logits``; or ``probs`` / ``log_probs``
    of logits / T, computed by the checker in the framework); ``reduction``: a key of ``REDUCTIONS``;
    ``t2``: the result is multiplied by T² (Hinton); ``masked_vocab``: the logits may hold ``-inf``
    (masked classes), so NaN there is a failure rather than a note; ``temperature``: the fixed T of a
    loss that does not take one; ``formula``: the divergence per row, ``exact`` (KL(teacher‖student)),
    ``swapped`` (the reverse KL(student‖teacher)) or ``jsd:BETA`` (generalized Jensen–Shannon, TRL GKD).
    """

    inputs: tuple[str, ...] = ("student", "teacher", "temperature")
    takes: str = "logits"
    reduction: str = "mean"
    t2: bool = True
    masked_vocab: bool = False
    temperature: float | None = None
    formula: str = "exact"

    def __post_init__(self) -> None:
        roles = sorted(self.inputs)
        if roles not in (["student", "teacher"], ["student", "teacher", "temperature"]):
            raise UsageError(f"--inputs must name student and teacher once each, and temperature at most once; "
                             f"got {','.join(self.inputs)}")  # fmt: skip
        if self.takes not in TAKES:
            raise UsageError(f"--takes must be one of {', '.join(TAKES)}; got {self.takes!r}")
        if self.reduction not in REDUCTIONS:
            raise UsageError(f"unknown reduction {self.reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if "temperature" not in self.inputs and self.temperature is None:
            raise UsageError("temperature is not among --inputs: give the temperature the loss uses with --temperature")
        if self.temperature is not None:
            try:
                oracle.check_temperature(self.temperature)
            except ValueError as e:
                raise UsageError(str(e)) from None
        beta = jsd_beta(self.formula)
        if self.formula not in DECLARABLE and not (beta is not None and 0.0 < beta < 1.0):
            raise UsageError(f"the declared formula must be forward KL, reverse KL or jsd:BETA with 0 < BETA < 1; "
                             f"got {self.formula!r}")  # fmt: skip

    @classmethod
    def parse(cls, inputs: str = DEFAULT_INPUTS, takes: str = "logits", expect: str = DEFAULT_EXPECT,
              masked_vocab: bool = False, temperature: float | None = None) -> Convention:  # fmt: skip
        """From the command-line strings: ``inputs`` and ``expect`` are comma lists (see the CLI help)."""
        roles = tuple(_role(n) for n in inputs.split(",") if n.strip())
        reduction, t2, formula = "mean", True, "exact"
        for word in (w.strip().lower() for w in expect.split(",") if w.strip()):
            if word == "hinton":
                reduction, t2 = "mean", True
            elif word in REDUCTIONS:
                reduction = word
            elif word in ("t2", "no-t2"):
                t2 = word == "t2"
            elif word in ("forward-kl", "reverse-kl"):
                formula = "exact" if word == "forward-kl" else "swapped"
            elif word.startswith("jsd:"):
                formula = _parse_jsd(word)
            else:
                raise UsageError(f"unknown --expect word {word!r}; use hinton, {', '.join(REDUCTIONS)}, t2, no-t2, "
                                 "forward-kl, reverse-kl, jsd:BETA")  # fmt: skip
        return cls(roles, takes.strip().lower().replace("-", "_"), reduction, t2, masked_vocab, temperature, formula)

    def describe(self) -> str:
        """The expected value in words."""
        scale = "T² · " if self.t2 else ""
        return f"{scale}{_REDUCTION_WORDS[self.reduction]} {declarable_words(self.formula)}"


def _parse_jsd(word: str) -> str:
    """``jsd:BETA`` -> the formula name; BETA 0 is the forward KL and 1 the reverse KL (as in TRL)."""
    try:
        beta = float(word.removeprefix("jsd:"))
    except ValueError:
        raise UsageError(f"--expect {word!r}: BETA of jsd:BETA must be a number in [0, 1]") from None
    if not 0.0 <= beta <= 1.0:
        raise UsageError(f"--expect {word!r}: BETA of jsd:BETA must be in [0, 1] (the teacher's weight in the mixture)")
    return "exact" if beta == 0.0 else "swapped" if beta == 1.0 else jsd_name(beta)
