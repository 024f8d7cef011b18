"""Check a user's distillation loss against the exact KL divergence, and name the bug when it is wrong.

``check_loss(fn, framework, convention)`` runs the user's function on a grid of deterministic cases
(``klparity.cases`` families; float32 and float64; (B, C) and (B, S, C) shapes; temperatures 0.5, 1,
2 and 4; classes masked with ``-inf``; a NaN logit), compares its value with the float64 oracle
(``oracle.kl_from_logits`` reduced as declared, times T² unless declared otherwise) and its gradient
w.r.t. the student logits with the analytic one (``gradients.exact_student_grad``), within the
derived tolerances of ``klparity.tolerances``.

When the value is wrong it searches a catalogue of known bugs, each a *factor* of the computation:

* the formula: arguments swapped (KL(student‖teacher)), probabilities passed where log-probabilities
  are expected, log-probabilities as a torch target without ``log_target``, log-probabilities or
  logits passed to Keras's probability-space loss, the temperature on one side only or on neither;
* the reduction: every element (torch ``'mean'``: off by C), the batch size B on (B, S, C) input
  (torch ``'batchmean'``), all rows, a sum, no reduction;
* the temperature factor: T² forgotten, T instead of T², T² applied twice (or applied when not expected);
* NaN handling: NaN on masked classes (0 · log 0 as 0 · (−inf)), NaN on every zero-probability
  teacher class (p · log p at p = 0), NaN logits swallowed.

Every combination is evaluated on the numbers, with each hypothesis's own error budget; the one with
the fewest bugs that reproduces every run (values, NaN and inf patterns) is the diagnosis, printed
with its evidence. Keras's clipping of probabilities to [1e-7, 1] (``keras.clip_epsilon``) is
accepted as correct for TensorFlow losses and reported as a note.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import itertools
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from klparity import oracle
from klparity.apis import DIFFERENCES
from klparity.apis.keras_kl_divergence import keras_grads
from klparity.cases import Case
from klparity.checks import Exact
from klparity.dtypes import DTYPE_NAMES, dtype_info, round_to, widen
from klparity.exact_grads import exact_student_grad, exact_teacher_grad
from klparity.frameworks import REGISTRY, runs_user_losses
from klparity.tolerances import (
    Budget,
    GradBudget,
    budget,
    grad_budget,
    table_row,
    user_loss_budget,
    user_loss_grad_budget,
)

F64 = NDArray[np.float64]
LossFn = Callable[..., Any]

#: Frameworks whose adapter runs a user's loss (``Adapter.run_user_loss``).
FRAMEWORKS: Final = runs_user_losses()
TAKES: Final = ("logits", "probs", "log_probs")
#: ``--expect`` reductions: name -> what the loss must divide the sum of per-row KLs by.
REDUCTIONS: Final[dict[str, str]] = {
    "mean": "the mean over all rows (B for (B, C), B·S for (B, S, C))",
    "batch": "the sum over all rows divided by the batch size B = shape[0] (torch 'batchmean')",
    "sum": "the sum over all rows",
    "per-token": "no reduction: one value per row, shape (B,) or (B, S)",
}
DEFAULT_INPUTS: Final = "student_logits,teacher_logits,temperature"
DEFAULT_EXPECT: Final = "mean,t2"
DEFAULT_DTYPES: Final = ("float32", "float64")

#: Module prefixes an import of which names the framework a loss file uses (each adapter's ``import_names``).
_IMPORT_FRAMEWORK: Final = {m: name for name in FRAMEWORKS for m in REGISTRY[name].import_names}


class UsageError(ValueError):
    """Bad input from the user (target, convention, signature): reported in one line, exit status 2."""


# ------------------------------------------------------------------------------------ convention


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
        red = {"mean": "mean over rows", "batch": "sum over rows / B", "sum": "sum over rows",
               "per-token": "per-row"}[self.reduction]  # fmt: skip
        return f"{scale}{red} {formula_words(self.formula)}"


def _parse_jsd(word: str) -> str:
    """``jsd:BETA`` -> the formula name; BETA 0 is the forward KL and 1 the reverse KL (as in TRL)."""
    try:
        beta = float(word.removeprefix("jsd:"))
    except ValueError:
        raise UsageError(f"--expect {word!r}: BETA of jsd:BETA must be a number in [0, 1]") from None
    if not 0.0 <= beta <= 1.0:
        raise UsageError(f"--expect {word!r}: BETA of jsd:BETA must be in [0, 1] (the teacher's weight in the mixture)")
    return "exact" if beta == 0.0 else "swapped" if beta == 1.0 else jsd_name(beta)


# --------------------------------------------------------------------------------- the case grid


def default_cases(ndims: Sequence[int] = (2, 3)) -> list[Case]:
    """The checker's grid: small shapes (fast), distinct B, S, C and T² so that the bug factors differ.

    Families from ``klparity.cases``: Gaussian logits, a peaked teacher, a NaN logit, and (judged only
    with a masked vocabulary, see ``has_masked_classes``) classes masked with -inf in both teacher and
    student or in the teacher only.
    """
    grid = [
        Case("gauss", (4, 50), 4.0, 3.0),
        Case("gauss", (2, 3, 50), 4.0, 3.0),
        Case("gauss", (4, 50), 1.0, 3.0),
        Case("gauss", (2, 3, 50), 1.0, 3.0),
        Case("gauss", (5, 10), 0.5, 3.0),
        Case("peaked", (4, 50), 2.0, 12.0),
        Case("nan", (4, 10), 2.0),
        Case("masked", (4, 50), 2.0, 0.25),
        Case("masked", (2, 3, 50), 4.0, 0.25),
        Case("teacher_masked", (4, 50), 1.0, 0.25),
    ]
    return [c for c in grid if len(c.shape) in ndims]


def at_temperature(grid: Iterable[Case], temperature: float) -> list[Case]:
    """The cases at one fixed temperature (for a loss that does not take one), without duplicates."""
    out = {c.id: c for c in (Case(c.family, c.shape, temperature, c.param) for c in grid)}
    return list(out.values())


def has_masked_classes(case: Case) -> bool:
    """The case's logits hold ``-inf`` (masked vocabulary, zero-probability teacher classes)."""
    return case.family in ("masked", "teacher_masked", "onehot", "student_masked")


# ----------------------------------------------------------------------------- framework runners


@dataclass(frozen=True)
class Observation:
    """One call of the user's loss: its value and gradient w.r.t. the student logits, widened."""

    case: Case
    dtype: str
    value: F64 | None
    value_dtype: str
    grad: F64 | None  #: d sum(loss) / d student logits; None: no gradient reached them
    warnings: tuple[str, ...] = ()
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.case.id} {self.dtype}"


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _args(conv: Convention, student: Any, teacher: Any, temperature: float) -> list[Any]:
    by_role = {"student": student, "teacher": teacher, "temperature": temperature}
    return [by_role[r] for r in conv.inputs]


def _call(fn: LossFn, conv: Convention) -> Callable[[Any, Any, Any], Any]:
    """The user's loss as ``call(student, teacher, temperature)``, its arguments in the declared order."""

    def call(student: Any, teacher: Any, temperature: Any) -> Any:
        return fn(*_args(conv, student, teacher, temperature))

    return call


def observe(fn: LossFn, framework: str, conv: Convention, case: Case, dtype: str) -> Observation:
    """Call the loss once on ``case`` rounded to ``dtype``; exceptions are recorded, not raised."""
    t64, s64 = case.logits()
    t, s = round_to(t64, dtype), round_to(s64, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # reported as evidence, never raised into the user's code
        try:
            value, grad, vdtype = REGISTRY[framework].run_user_loss(_call(fn, conv), conv.takes, t, s, case.temperature,
                                                                    key=(fn, conv))  # fmt: skip
        except Exception as e:  # the user's code: any exception is a finding about it
            return Observation(case, dtype, None, "", None, error=_error(e))
    msgs = tuple(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    return Observation(case, dtype, np.asarray(value, np.float64), vdtype, grad, msgs)


# ------------------------------------------------------------------------------------ hypotheses


@dataclass(frozen=True)
class Factor:
    """One value of one factor of the computation; ``bug`` is empty for the correct value."""

    name: str
    bug: str  #: hypothesis name when this is a bug, else ""
    text: str  #: what it means, in words


#: Formulas: per-row quantities a loss can compute instead of the declared one (by default ``exact``,
#: KL(teacher‖student); ``--expect reverse-kl`` declares ``swapped``, ``--expect jsd:BETA`` a ``jsd:BETA``).
#: ``bug`` is the name when the formula is found where another was declared.
FORMULAS: Final[dict[str, Factor]] = {f.name: f for f in (
    Factor("exact", "forward-kl", "the value is the forward KL(teacher‖student), not the declared divergence"),
    Factor("swapped", "reverse-kl", "the value is the reverse KL(student‖teacher), not KL(teacher‖student): "
           "teacher and student exchanged (torch: kl_div(input=log teacher, target=student); Keras: y_true and "
           "y_pred exchanged), or reverse KL on purpose (declare it with --expect reverse-kl)"),
    Factor("cross-entropy", "cross-entropy-not-kl", "the value is the cross-entropy H(teacher, student) = "
           "KL(teacher‖student) + H(teacher): off by the teacher's entropy (times the temperature factor), "
           "which has no gradient in the student, so the gradient is right (F.cross_entropy with soft "
           "targets, categorical_crossentropy, optax.softmax_cross_entropy)"),
    Factor("probs-input", "probs-as-log-probs", "probabilities passed where log-probabilities are expected: "
           "kl_div(softmax(s/T), softmax(t/T)) computes Σ p log p − Σ p·q"),
    Factor("log-target", "log-probs-as-target", "log-probabilities passed as torch's target without "
           "log_target=True, or the two arguments of kl_div(log q, p) exchanged (kl_div(p, log q)): xlogy of "
           "a negative number is NaN (the two are NaN alike on every run)"),
    Factor("log-probs-clipped", "log-probs-as-probs", "log-probabilities passed to a loss that takes "
           "probabilities (Keras KLDivergence): every value is clipped to 1e-7 and the loss is 0"),
    Factor("logits-clipped", "logits-as-probs", "logits / T passed to a loss that takes probabilities "
           "(Keras KLDivergence) without a softmax: they are clipped to [1e-7, 1]"),
    Factor("student-T", "student-temperature-only", "temperature applied to the student only: "
           "KL(softmax(t) ‖ softmax(s/T))"),
    Factor("teacher-T", "teacher-temperature-only", "temperature applied to the teacher only: "
           "KL(softmax(t/T) ‖ softmax(s))"),
    Factor("no-T", "temperature-ignored", "temperature applied to neither softmax: KL(softmax(t) ‖ softmax(s))"),
)}  # fmt: skip
#: Formulas the convention may declare (``--expect``): the forward KL, the reverse KL and a ``jsd:BETA``.
DECLARABLE: Final = ("exact", "swapped")


def jsd_beta(formula: str) -> float | None:
    """The beta of a ``jsd:BETA`` formula name, None for any other formula."""
    return float(formula.removeprefix("jsd:")) if formula.startswith("jsd:") else None


def jsd_name(beta: float, digits: int = 10) -> str:
    """The formula name of the generalized JSD with weight ``beta`` on the teacher."""
    return f"jsd:{beta:.{digits}g}"


def formula_words(formula: str) -> str:
    """What a formula computes, in words (for the declared one, and the report)."""
    beta = jsd_beta(formula)
    if beta is not None:
        return (f"generalized JSD with beta {beta:.6g}: β·KL(teacher‖m) + (1−β)·KL(student‖m), "
                "m = β·teacher + (1−β)·student")  # fmt: skip
    return {"exact": "KL(teacher‖student)", "swapped": "KL(student‖teacher)"}.get(formula, FORMULAS[formula].text)


def _formula_factor(expected: str, actual: str) -> Factor:
    """The formula factor of a hypothesis: no bug when it is the declared formula."""
    if actual == expected:
        return Factor(actual, "", formula_words(actual))
    beta = jsd_beta(actual)
    if beta is not None:
        return Factor(actual, "jsd", f"the value is the {formula_words(actual)} (TRL GKD's generalized_jsd_loss), "
                      f"not the declared {formula_words(expected)}")  # fmt: skip
    f = FORMULAS[actual]
    if expected != "exact" and actual in DECLARABLE:
        return Factor(actual, f.bug, f"the value is {formula_words(actual)}, not the declared "
                      f"{formula_words(expected)}")  # fmt: skip
    return f


#: Formulas that are probability-space KLs, with a clipped variant for Keras (``Hypothesis.clipped``;
#: Keras's own clipping of the exact formula, ``keras.clip_epsilon``, counts as correct).
_CLIPPABLE: Final = ("exact", "swapped", "student-T", "teacher-T", "no-T")

#: NaN behaviours laid over a formula; those on masked classes count only with ``masked_vocab``.
MASKED_OVERLAYS: Final = ("masked-nan", "zero-prob-nan")
OVERLAYS: Final[dict[str, Factor]] = {f.name: f for f in (
    Factor("none", "", "NaN exactly where the exact KL is NaN"),
    Factor("masked-nan", "nan-masked-vocab", "NaN on every row with a class masked (-inf) in both teacher and "
           "student: 0 · log 0 computed as 0 · (−inf) (torch kl_div / optax on a masked vocabulary); the exact "
           "KL there is finite"),
    Factor("zero-prob-nan", "nan-zero-teacher-prob", "NaN on every row where the teacher gives a class "
           "probability 0 (masked vocabulary, one-hot targets): p · (log p − log q) evaluated at p = 0 as "
           "0 · (−inf) instead of 0"),
    Factor("nan-swallowed", "nan-swallowed", "a NaN logit gives a finite loss: NaN is swallowed (nan_to_num, "
           "where(p > 0, …), masking) and a diverged teacher or student goes unnoticed"),
)}  # fmt: skip


_REDUCTION_BUGS: Final = {
    "elements": ("mean-over-elements", "divides by every element (B·C, or B·S·C), not by the rows: torch "
                 "reduction='mean', or a mean over the class axis too, makes the loss C times too small"),
    "batch": ("divides-by-B", "divides by B = shape[0]: torch reduction='batchmean' on (B, S, C) input takes it "
              "for a batch of B, so the mean over B·S tokens comes out S times too large"),
    "mean": ("divides-by-all-rows", "divides by all rows (B·S for (B, S, C)): a mean over every token"),
    "sum": ("sum-over-rows", "sums the rows without dividing (reduction='sum')"),
    "per-token": ("unreduced", "returns one value per row: no reduction"),
}


def fixed_divisor(reduction: str) -> float | None:
    """The constant of a ``fixed:D`` reduction (the sum divided by D whatever the shape), else None."""
    return float(reduction.removeprefix("fixed:")) if reduction.startswith("fixed:") else None


def _reduction_factor(expected: str, actual: str) -> Factor:
    d = fixed_divisor(actual)
    if d is not None:
        return Factor(actual, "fixed-divisor", f"divides the sum over rows by the constant {d:.10g} whatever the "
                      f"shape, not by {REDUCTIONS[expected]}: a hard-coded batch size or sequence length, right "
                      f"only for inputs with exactly that many rows")  # fmt: skip
    if actual == expected:
        return Factor(actual, "", REDUCTIONS[actual])
    if expected == "per-token":
        return Factor(actual, "reduced", f"reduces the rows where one value per row was declared: "
                      f"{_REDUCTION_BUGS[actual][1]}")  # fmt: skip
    name, text = _REDUCTION_BUGS[actual]
    return Factor(actual, name, f"{text} (declared: {REDUCTIONS[expected]})")


#: Temperature factors, by the declared power of T (2: Hinton's T², 0: none) and the observed one.
_SCALE_BUGS: Final[dict[int, dict[int, tuple[str, str]]]] = {
    2: {0: ("t2-forgotten", "the T² factor is missing: the loss is T² times too small, and its gradient "
            "shrinks as 1/T² instead of staying comparable across temperatures"),
        1: ("t-instead-of-t2", "multiplies by T instead of T²"),
        4: ("t2-applied-twice", "T² is applied twice: the loss is T² times too large")},
    0: {2: ("t2-applied", "multiplies by T² although no temperature factor was declared (--expect t2 if "
            "that is intended)"),
        1: ("t-applied", "multiplies by T although no temperature factor was declared"),
        4: ("t4-applied", "multiplies by T⁴ although no temperature factor was declared")},
}  # fmt: skip


def _scale_factor(expected: int, power: int) -> Factor:
    if power == expected:
        return Factor(f"T^{power}", "", "T²" if power == 2 else "no temperature factor")
    name, text = _SCALE_BUGS[expected][power]
    return Factor(f"T^{power}", name, text)


_POWERS: Final = (2, 0, 1, 4)


@dataclass(frozen=True)
class Hypothesis:
    """A combination of one value per factor: what the loss computes."""

    form: Factor  #: the formula (``form.name``, a key of ``FORMULAS`` or ``jsd:BETA``)
    clipped: bool
    reduction: Factor
    scale: Factor
    overlay: str

    @property
    def formula(self) -> str:
        return self.form.name

    def bugs(self) -> list[Factor]:
        """The factors that are bugs, formula first."""
        parts = [self.form, self.reduction, self.scale, OVERLAYS[self.overlay]]
        return [f for f in parts if f.bug]

    @property
    def names(self) -> list[str]:
        return [f.bug for f in self.bugs()]

    @property
    def power(self) -> int:
        return int(self.scale.name.removeprefix("T^"))


@dataclass(frozen=True)
class Fitted:
    """A hypothesis with a parameter fitted on one run (a JSD's beta, a constant divisor): its formula,
    reduction and power of T; every overlay is tried with it, and every run must agree."""

    formula: str
    reduction: str
    power: int


def hypotheses(conv: Convention, framework: str, fitted: Sequence[Fitted] = ()) -> list[Hypothesis]:
    """Every combination of the catalogue, then the fitted ones; the correct one first, then by number of bugs."""
    expected_power = 2 if conv.t2 else 0
    formulas = [(f, False) for f in FORMULAS]
    if jsd_beta(conv.formula) is not None:
        formulas.append((conv.formula, False))
    if REGISTRY[framework].user_losses_clip:
        formulas += [(f, True) for f in _CLIPPABLE]
    combos = [(f, clipped, r, k) for (f, clipped), r, k in itertools.product(formulas, _REDUCTION_BUGS, _POWERS)]
    combos += [(f.formula, clipped, f.reduction, f.power) for f in fitted for clipped in (False, True)
               if not clipped or (REGISTRY[framework].user_losses_clip and f.formula in _CLIPPABLE)]
    out = [
        Hypothesis(_formula_factor(conv.formula, f), clipped, _reduction_factor(conv.reduction, r),
                   _scale_factor(expected_power, k), o)
        for (f, clipped, r, k), o in itertools.product(dict.fromkeys(combos), OVERLAYS)
    ]  # fmt: skip
    return sorted(out, key=lambda h: (len(h.bugs()), h.clipped))


# --------------------------------------------------------------------------------------- oracle


_ONE_SIDED: Final = {"student-T": (1.0, None), "teacher-T": (None, 1.0), "no-T": (1.0, 1.0)}


def _formula_logs(formula: str, ex: Exact) -> tuple[F64, F64, F64, F64, float]:
    """(log P, log Q, z^P, z^Q, T of the student) of a probability-space formula KL(P‖Q), before any swap."""
    temp = ex.temperature
    if formula in _ONE_SIDED:
        tt, ts = (temp if v is None else v for v in _ONE_SIDED[formula])
        return oracle.log_softmax(ex.teacher, tt), oracle.log_softmax(ex.student, ts), ex.teacher / tt, \
            ex.student / ts, ts  # fmt: skip
    return ex.lp, ex.lq, ex.zt, ex.zs, temp


@dataclass
class _Prepared:
    """Oracle quantities of one observation, computed once; formula rows and budgets on demand."""

    obs: Observation
    ex: Exact
    framework: str
    compute: str
    eps: float
    _rows: dict[tuple[str, bool], tuple[F64, Budget]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.obs.case.shape

    def _kl(self, lp: F64, lq: F64, zt: F64, zs: F64, clipped: bool) -> tuple[F64, Budget]:
        p, q = np.exp(lp), np.exp(lq)
        if clipped:
            pt, qt = np.clip(p, self.eps, 1.0), np.clip(q, self.eps, 1.0)
            rows = oracle.keras_kl_divergence(p, q, reduction=None, epsilon=self.eps)
            return rows, self._budget(pt, qt, zt, zs, None, None, True)
        return oracle.kl_from_log_probs(lp, lq), self._budget(p, q, zt, zs, lp, lq, False)

    def _budget(self, p: F64, q: F64, zt: F64, zs: F64, lp: F64 | None, lq: F64 | None, prob: bool) -> Budget:
        b = budget(framework=self.framework, input_dtype=self.obs.dtype, compute_dtype=self.compute,
                   p=p, q=q, zt=zt, zs=zs, student_is_probability=prob, log_p=lp, log_q=lq)  # fmt: skip
        return user_loss_budget(b, self.compute)

    def rows(self, formula: str, clipped: bool) -> tuple[F64, Budget]:
        """Per-row value of a formula (before reduction and scale) and its error budget."""
        key = (formula, clipped)
        if key not in self._rows:
            self._rows[key] = self._compute(formula, clipped)
        return self._rows[key]

    def _compute(self, formula: str, clipped: bool) -> tuple[F64, Budget]:
        ex = self.ex
        if formula == "exact" and not clipped:
            return ex.rows, self._budget(ex.p, ex.q, ex.zt, ex.zs, ex.lp, ex.lq, False)
        if formula in _CLIPPABLE:
            lp, lq, zt, zs, _ = _formula_logs(formula, ex)
            if formula == "swapped":
                lp, lq, zt, zs = lq, lp, zs, zt
            return self._kl(lp, lq, zt, zs, clipped)
        exact_budget = self.rows("exact", False)[1]
        beta = jsd_beta(formula)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if beta is not None:
                return self._jsd(beta, exact_budget)
            if formula == "cross-entropy":  # H(p, q) = KL(p‖q) + H(p); NaN rows stay NaN through KL
                rows = ex.rows + np.sum(np.where(ex.p > 0, -ex.p * ex.lp, 0.0), axis=-1)
            elif formula == "probs-input":
                rows = np.sum(oracle.torch_pointwise(ex.q, ex.p), axis=-1)
            elif formula == "log-target":
                rows = np.sum(oracle.torch_pointwise(ex.lq, ex.lp), axis=-1)
            elif formula == "log-probs-clipped":
                rows = oracle.keras_kl_divergence(ex.lp, ex.lq, reduction=None, epsilon=self.eps)
            elif formula == "logits-clipped":
                rows = oracle.keras_kl_divergence(ex.zt, ex.zs, reduction=None, epsilon=self.eps)
            else:
                raise ValueError(f"unknown formula {formula!r}")
        # each summand of these is bounded by the exact formula's e_j (p|log p|, p|log q|, p q <= p), so
        # its error budget bounds theirs too
        return np.asarray(rows, np.float64), exact_budget

    def _jsd(self, beta: float, exact_budget: Budget) -> tuple[F64, Budget]:
        """β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q, as TRL computes it (log m by logsumexp).

        Its summands are p|log p − log m| and q|log q − log m| with |log m| <= max(|log p|, |log q|):
        the forward KL's budget covers the first, the reverse KL's (``swapped``) the second.
        """
        ex = self.ex
        lm = oracle.log_mixture(ex.lp, ex.lq, beta)
        rows = beta * oracle.kl_from_log_probs(ex.lp, lm) + (1.0 - beta) * oracle.kl_from_log_probs(ex.lq, lm)
        return np.asarray(rows, np.float64), exact_budget.plus(self.rows("swapped", False)[1])


def _divisor(reduction: str, shape: tuple[int, ...]) -> float:
    fixed = fixed_divisor(reduction)
    if fixed is not None:
        return fixed
    rows = math.prod(shape[:-1])
    return {"mean": rows, "batch": shape[0], "sum": 1, "elements": math.prod(shape), "per-token": 1}[reduction]


def _reduce(rows: F64, bud: Budget, reduction: str, shape: tuple[int, ...]) -> tuple[F64, F64]:
    """(value, tolerance) of a reduction of per-row values."""
    if reduction == "per-token":
        return rows, bud.rows()
    div = _divisor(reduction, shape)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(np.sum(rows) / div), np.asarray(bud.total() / div)


@dataclass(frozen=True)
class Prediction:
    """What a hypothesis predicts for one observation: value, tolerance and entries left free."""

    value: F64
    tolerance: F64
    free: NDArray[np.bool_]  #: entries where any finite value is accepted (NaN swallowed)


def predict(h: Hypothesis, prep: _Prepared) -> Prediction:
    """The value ``h`` predicts for one observation."""
    rows, bud = prep.rows(h.formula, h.clipped)
    ex = prep.ex
    free_rows = np.zeros(rows.shape, dtype=bool)
    if h.overlay == "masked-nan":
        rows = np.where(np.any((ex.lp == -np.inf) & (ex.lq == -np.inf), axis=-1), np.nan, rows)
    elif h.overlay == "zero-prob-nan":
        rows = np.where(np.any(ex.lp == -np.inf, axis=-1), np.nan, rows)
    elif h.overlay == "nan-swallowed":
        free_rows = np.isnan(ex.rows)
    value, tol = _reduce(rows, bud, h.reduction.name, prep.shape)
    scale = ex.temperature**h.power
    free = free_rows if h.reduction.name == "per-token" else np.asarray(free_rows.any())
    return Prediction(np.asarray(value * scale, np.float64), np.asarray(tol * scale, np.float64), free)


def matches(value: F64 | None, pred: Prediction) -> bool:
    """Same shape, same NaN and inf pattern, finite entries within tolerance (free entries: finite)."""
    if value is None or value.shape != pred.value.shape:
        return False
    ref, free = pred.value, pred.free
    nan_o, nan_r = np.isnan(value), np.isnan(ref)
    if np.any(free & ~np.isfinite(value)):
        return False
    fixed = ~free
    if np.any((nan_o != nan_r) & fixed):
        return False
    inf_r = np.isinf(ref) & fixed
    if np.any(value[inf_r] != ref[inf_r]):
        return False
    fin = fixed & ~nan_r & ~inf_r
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(np.abs(value[fin] - ref[fin]) <= np.broadcast_to(pred.tolerance, ref.shape)[fin]))


# ------------------------------------------------------------------------------------- gradients


def _grad_model(formula: str, prep: _Prepared, clipped: bool) -> tuple[F64, Callable[[float], F64]] | None:
    """d(per-row value)/d(student logits) of a formula and its tolerance as a function of the scale.

    None where the formula's gradient is not modelled. The tolerance is ``tolerances.grad_budget`` on
    the formula's own distributions: its student form for KL(P‖Q) in Q's logits, its teacher form
    for KL(Q‖P) (arguments swapped: the student is differentiated as the target).
    """
    if clipped:
        return _clipped_grad_model(formula, prep)
    ex, temp = prep.ex, prep.ex.temperature

    def gb(lp: F64, lq: F64, zt: F64, zs: F64, t_div: float) -> GradBudget:
        with np.errstate(invalid="ignore", over="ignore"):
            p, q = np.exp(lp), np.exp(lq)
            h = np.where(p > 0, lp + 1.0 - lq, 0.0)
        return user_loss_grad_budget(grad_budget(
            framework=prep.framework, input_dtype=prep.obs.dtype, compute_dtype=prep.compute, temperature=t_div,
            weight=p, p=p, q=q, h=h, zt=zt, zs=zs, log_p=lp, log_q=lq, student_is_probability=False))

    if formula in ("exact", "cross-entropy"):  # H(teacher) does not depend on the student
        return exact_student_grad(ex.teacher, ex.student, temp), gb(ex.lp, ex.lq, ex.zt, ex.zs, temp).student
    beta = jsd_beta(formula)
    if beta is not None:  # d JSD / d q_j = (1 − β) log(q_j / m_j), through the softmax of s / T
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            lm = oracle.log_mixture(ex.lp, ex.lq, beta)
            g = np.where(ex.q > 0, (1.0 - beta) * (ex.lq - lm), 0.0)
            grad = ex.q * (g - np.sum(ex.q * g, axis=-1, keepdims=True)) / temp
        fwd, rev = gb(ex.lp, ex.lq, ex.zt, ex.zs, temp).student, gb(ex.lq, ex.lp, ex.zs, ex.zt, temp).teacher
        return np.asarray(grad, np.float64), lambda scale: np.asarray(fwd(scale) + rev(scale), np.float64)
    if formula in _ONE_SIDED:
        lp, lq, zt, zs, ts = _formula_logs(formula, ex)
        return np.asarray((np.exp(lq) - np.exp(lp)) / ts, np.float64), gb(lp, lq, zt, zs, ts).student
    if formula == "swapped":  # d KL(softmax(s/T) ‖ softmax(t/T)) / d s: the first argument's gradient
        return exact_teacher_grad(ex.student, ex.teacher, temp), gb(ex.lq, ex.lp, ex.zs, ex.zt, temp).teacher
    if formula == "probs-input":  # d/ds_k of -sum_j p_j q_j = -(q_k / T) (p_k - sum_j p_j q_j)
        pq = np.sum(ex.p * ex.q, axis=-1, keepdims=True)
        grad = np.asarray(-ex.q * (ex.p - pq) / temp, np.float64)
        return grad, gb(ex.lp, ex.lq, ex.zt, ex.zs, temp).student  # magnitudes q_k p_k <= p_k: bounded alike
    return None


def _clip_masks(prep: _Prepared, x: F64, z: F64) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(surely passes, surely clipped) for Keras's clip of probabilities ``x`` to [eps, 1].

    The framework's probability carries the softmax stage's relative error (``c_in`` of the tolerance
    row, in the coarser of the input and compute dtypes); within it of eps the clip could go either way.
    """
    u = max(dtype_info(prep.obs.dtype).unit_roundoff, dtype_info(prep.compute).unit_roundoff)
    c_in = table_row(prep.framework, prep.obs.dtype).c_in
    log2c = math.log2(max(x.shape[-1], 2))
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(z)
        m = np.max(np.where(fin, np.abs(z), 0.0), axis=-1, keepdims=True)
        band = c_in * u * (np.where(fin, np.abs(z), 0.0) + m + log2c + 1.0)
        # as apis.keras_kl_divergence.clip_passes: a NaN passes the clip (and its gradient)
        return np.asarray(~((x * (1.0 - band) < prep.eps) | (x > 1.0))), np.asarray(x * (1.0 + band) < prep.eps)


def _clipped_grad_model(formula: str, prep: _Prepared) -> tuple[F64, Callable[[float], F64]] | None:
    """Keras's clipped formula differentiated exactly (``apis.keras_kl_divergence.keras_grads``), for the
    student logits.

    A class whose y_pred is within rounding of eps may or may not pass the clip: it is taken as clipped,
    and the tolerance gains what passing would change, (a_k + q_k sum_j a_j) / T with a_j its clipped y_true.
    """
    if formula not in _CLIPPABLE:
        return None
    ex = prep.ex
    lp, lq, zp, zq, t_div = _formula_logs(formula, ex)
    swapped = formula == "swapped"
    if swapped:  # KL(q‖p): the student is y_true
        lp, lq, zp, zq = lq, lp, zq, zp
    p, q = np.exp(lp), np.exp(lq)
    mt, _ = _clip_masks(prep, p, zp)
    mp, clipped_p = _clip_masks(prep, q, zq)
    g_pred, g_true = keras_grads(p, q, t_div, epsilon=prep.eps, mask_true=mt, mask_pred=mp)
    t, u = np.where(mt, p, prep.eps), np.where(mp, q, prep.eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(mt, np.log(t / u) + 1.0, 0.0)
    gb = user_loss_grad_budget(grad_budget(
        framework=prep.framework, input_dtype=prep.obs.dtype, compute_dtype=prep.compute, temperature=t_div,
        weight=np.where(mp, t, 0.0), p=p, q=q, h=h, zt=zp, zs=zq, log_p=lp, log_q=lq, student_is_probability=True))
    if swapped:
        return g_true, gb.teacher
    a = np.where(~mp & ~clipped_p, np.clip(p, prep.eps, 1.0), 0.0)
    borderline = np.asarray((a + q * np.sum(a, axis=-1, keepdims=True)) / t_div, np.float64)
    return g_pred, lambda scale: np.asarray(gb.student(scale) + scale * borderline, np.float64)


@dataclass(frozen=True)
class GradCheck:
    """Gradient of one observation against a hypothesis: reference, and the verdict."""

    ok: bool
    worst: float  #: max |error| / tolerance over finite entries
    reference: F64 | None


def grad_factor(h: Hypothesis, prep: _Prepared) -> float:
    """What the reduction and the temperature factor multiply each row's gradient by."""
    return prep.ex.temperature**h.power / _divisor(h.reduction.name, prep.shape)


def check_grad(h: Hypothesis, prep: _Prepared) -> GradCheck:
    """Compare the observed gradient with the one ``h`` predicts (exact, or Keras's clipped formula).

    NaN overlays are not modelled here: callers leave out the runs whose rows they decide.
    """
    model = _grad_model(h.formula, prep, h.clipped)
    if model is None:
        return GradCheck(False, math.inf, None)
    g_rows, tolerance = model
    factor = grad_factor(h, prep)
    ref = np.asarray(g_rows * factor, np.float64)
    obs = prep.obs.grad
    if obs is None:
        return GradCheck(False, math.inf, ref)
    tol = tolerance(abs(factor))
    nan_o, nan_r = np.isnan(obs), np.isnan(ref)
    if obs.shape != ref.shape or np.any(nan_o != nan_r):
        return GradCheck(False, math.inf, ref)
    fin = ~nan_r
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(obs[fin] - ref[fin])
        t = tol[fin]
        ratio = np.where(t > 0, err / t, np.where(err == 0, 0.0, np.inf))
    worst = float(np.max(ratio)) if ratio.size else 0.0
    return GradCheck(worst <= 1.0, worst, ref)


# -------------------------------------------------------------------------------------- the check


@dataclass
class RunVerdict:
    """The verdict on one observation against the declared convention."""

    obs: Observation
    judged: bool  #: counts for the exit status (masked cases only with ``masked_vocab``)
    value_ok: bool
    grad_ok: bool
    value_worst: float  #: error / tolerance of the value (inf when the pattern differs)
    grad_worst: float
    expected: F64 | None
    clipped: bool  #: matched only through Keras's clipping

    @property
    def ok(self) -> bool:
        return self.value_ok and self.grad_ok


@dataclass
class Diagnosis:
    """What explains the observations (or comes closest), with its evidence.

    ``bugs`` are the diagnosis proper; ``excused`` the NaN behaviours on masked classes when the
    convention does not declare a masked vocabulary (reported, not judged).
    """

    bugs: list[Factor]
    excused: list[Factor]
    explained: int
    total: int
    unexplained: list[str] = field(default_factory=list)
    alternatives: list[Hypothesis] = field(default_factory=list)  #: as consistent, as few bugs
    evidence: list[str] = field(default_factory=list)
    grad_note: str = ""

    @property
    def complete(self) -> bool:
        return self.explained == self.total

    @property
    def names(self) -> list[str]:
        """Every bug named, the judged ones first."""
        return [f.bug for f in self.bugs + self.excused]


@dataclass
class LossReport:
    """Everything ``check_loss`` found; ``text()`` is what the CLI prints."""

    target: str
    framework: str
    convention: Convention
    verdicts: list[RunVerdict]
    diagnosis: Diagnosis | None  #: why the judged runs fail, None when they pass
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts if v.judged)

    @property
    def bug_names(self) -> list[str]:
        """The bugs that make the check fail (without the unjudged ones on masked classes)."""
        return [f.bug for f in self.diagnosis.bugs] if self.diagnosis else []

    def text(self) -> str:
        """A report that stands alone: the convention, the verdict, the diagnosis and its evidence."""
        conv = self.convention
        judged = [v for v in self.verdicts if v.judged]
        dtypes = sorted({v.obs.dtype for v in self.verdicts})
        temps = sorted({v.obs.case.temperature for v in self.verdicts})
        masked = "; masked vocabulary" if conv.masked_vocab else ""
        shapes = ", ".join(sorted({str(v.obs.case.shape) for v in self.verdicts}))
        lines = [f"klparity check {self.target} ({self.framework}; inputs {','.join(conv.inputs)}; takes "
                 f"{conv.takes}; expects {conv.describe()}{masked})",
                 f"  {len(self.verdicts)} runs: {', '.join(dtypes)}; T {', '.join(f'{t:g}' for t in temps)}; "
                 f"shapes {shapes}"]  # fmt: skip
        if self.ok:
            worst_v = max((v.value_worst for v in judged), default=0.0)
            worst_g = max((v.grad_worst for v in judged), default=0.0)
            lines.append(f"ok: value and gradient w.r.t. the student logits match in all {len(judged)} judged runs "
                         f"(worst error/tolerance: value {worst_v:.2g}, gradient {worst_g:.2g})")  # fmt: skip
        else:
            bad_v = sum(not v.value_ok for v in judged)
            bad_g = sum(not v.grad_ok for v in judged)
            lines.append(f"FAIL: value wrong in {bad_v} of {len(judged)} runs, gradient w.r.t. the student logits "
                         f"wrong in {bad_g} of {len(judged)}")  # fmt: skip
            if self.diagnosis:
                lines += _diagnosis_lines(self.diagnosis)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _diagnosis_lines(d: Diagnosis) -> list[str]:
    names = " + ".join(f.bug for f in d.bugs) or "unexplained"
    if d.complete:
        lines = [f"diagnosis: {names}"]
    else:
        lines = [f"diagnosis: no known bug explains every run; closest: {names} (explains {d.explained} of {d.total})"]
    lines += [f"  {f.bug}: {f.text}" for f in d.bugs]
    if d.total and not any(f.name == "gradient" for f in d.bugs):
        lines.append(f"  evidence: reproduces {d.explained} of {d.total} runs (value, NaN and inf pattern, each "
                     "within the hypothesis's own error budget)")  # fmt: skip
    if d.alternatives:
        alt = "; ".join(" + ".join(h.names) for h in d.alternatives)
        lines.append(f"  equally consistent: {alt}")
    if d.unexplained:
        more = " …" if len(d.unexplained) > 6 else ""
        lines.append(f"  not explained: {', '.join(d.unexplained[:6])}{more}")
    lines += [f"    {e}" for e in d.evidence]
    if d.grad_note:
        lines.append(f"  gradient: {d.grad_note}")
    if d.excused:
        lines.append("  also, on masked (-inf) classes (not judged: pass --masked-vocab if your logits hold -inf): "
                     + "; ".join(f"{f.bug}: {f.text}" for f in d.excused))  # fmt: skip
    return lines


def _fmt(x: F64 | None) -> str:
    if x is None:
        return "-"
    a = np.asarray(x)
    if a.ndim == 0:
        return f"{float(a):.7g}"
    flat = ", ".join(f"{float(v):.4g}" for v in a.ravel()[:3])
    return f"[{flat}{', …' if a.size > 3 else ''}] (shape {a.shape})"


def _ratio_text(obs: F64 | None, ref: F64 | None) -> str:
    if obs is None or ref is None or np.ndim(obs) or np.ndim(ref):
        return ""
    o, r = float(obs), float(ref)
    if not (math.isfinite(o) and math.isfinite(r)) or r == 0 or o == 0:
        return ""
    q = o / r
    return f"; got/correct = {q:.6g}" + (f" = 1/{1 / q:.6g}" if abs(q) < 0.5 else "")


def _expected(conv: Convention, framework: str) -> list[Hypothesis]:
    """The correct hypotheses: the declared formula, and for TensorFlow also Keras's clipped version of it."""
    power = 2 if conv.t2 else 0
    red, scale = _reduction_factor(conv.reduction, conv.reduction), _scale_factor(power, power)
    form = _formula_factor(conv.formula, conv.formula)
    out = [Hypothesis(form, False, red, scale, "none")]
    if REGISTRY[framework].user_losses_clip and conv.formula in _CLIPPABLE:
        out.append(Hypothesis(form, True, red, scale, "none"))
    return out


def _judge(prep: _Prepared, correct: list[Hypothesis], judged: bool) -> RunVerdict:
    obs = prep.obs
    best: RunVerdict | None = None
    for h in correct:
        pred = predict(h, prep)
        value_ok = obs.error is None and matches(obs.value, pred)
        worst = _worst(obs.value, pred) if obs.value is not None else math.inf
        gc = check_grad(h, prep) if obs.error is None else GradCheck(False, math.inf, None)
        v = RunVerdict(obs, judged, value_ok, gc.ok, worst, gc.worst, pred.value, h.clipped)
        if v.ok:
            return v
        best = best or v
    assert best is not None
    return best


def _worst(value: F64 | None, pred: Prediction) -> float:
    if value is None or value.shape != pred.value.shape:
        return math.inf
    ref = pred.value
    if np.any(np.isnan(value) != np.isnan(ref)):
        return math.inf
    fin = np.isfinite(ref)
    if np.any(value[~fin & ~np.isnan(ref)] != ref[~fin & ~np.isnan(ref)]):
        return math.inf
    tol = np.broadcast_to(pred.tolerance, ref.shape)[fin]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(value[fin] - ref[fin])
        r = np.where(tol > 0, err / tol, np.where(err == 0, 0.0, np.inf))
    return float(np.max(r)) if r.size else 0.0


def _judged(h: Hypothesis, conv: Convention) -> list[Factor]:
    """The bugs of ``h`` that count: NaN on masked classes only with a declared masked vocabulary."""
    return [f for f in h.bugs() if conv.masked_vocab or f.name not in MASKED_OVERLAYS]


def diagnose(preps: list[_Prepared], conv: Convention, framework: str) -> Diagnosis:
    """The hypothesis with the fewest bugs that reproduces every observation's value (or the closest)."""
    valid = [p for p in preps if p.obs.error is None]
    labels = [p.obs.label for p in valid]

    def rank(h: Hypothesis) -> tuple[int, int, bool]:
        return len(_judged(h, conv)), len(h.bugs()), h.clipped

    cands = sorted(hypotheses(conv, framework, fit_parameters(valid, conv)), key=rank)
    full = [h for h in cands if all(matches(p.obs.value, predict(h, p)) for p in valid)]
    if full:
        best, explained, unexplained = [h for h in full if rank(h)[:2] == rank(full[0])[:2]], len(valid), []
    else:  # nothing explains everything: the one explaining most runs, among hypotheses of <= 2 bugs
        hits = {h: [matches(p.obs.value, predict(h, p)) for p in valid] for h in cands if len(h.bugs()) <= 2}
        top = max(sum(v) for v in hits.values())
        best = [h for h in hits if sum(hits[h]) == top]
        best = [h for h in best if rank(h)[:2] == rank(best[0])[:2]]
        explained = top
        unexplained = [lab for lab, ok in zip(labels, hits[best[0]], strict=True) if not ok]
    chosen = best[0]
    judged = _judged(chosen, conv)
    excused = [f for f in chosen.bugs() if f not in judged]
    alternatives = [h for h in best[1:] if h.clipped == chosen.clipped]
    return Diagnosis(judged, excused, explained, len(valid), unexplained, alternatives,
                     _evidence(chosen, valid, conv, framework), _grad_note(chosen, valid))  # fmt: skip


#: The standard divisors and powers of T a fitted parameter is combined with.
_FIT_REDUCTIONS: Final = ("mean", "batch", "sum", "elements")
#: Where a JSD's beta is searched: a grid on (0, 1), refined between sign changes by Brent's method.
_BETA_GRID: Final = np.linspace(0.0, 1.0, 201)[1:-1]


def _fit_runs(preps: list[_Prepared]) -> list[_Prepared]:
    """Runs a parameter is fitted on: float64, finite nonzero value, no masked class or NaN logit; (B, S, C) first
    (there B, B·S and C differ)."""
    runs = [p for p in preps if p.obs.dtype == "float64" and p.obs.value is not None and not has_masked_classes(
        p.obs.case) and not np.isnan(p.ex.rows).any() and np.all(np.isfinite(p.obs.value)) and np.all(p.obs.value)]
    return sorted(runs, key=lambda p: (p.compute != "float64", -len(p.shape)))


def fit_parameters(preps: list[_Prepared], conv: Convention) -> list[Fitted]:
    """Hypotheses with a parameter solved for on one run: the constant D a sum over rows is divided by (of the
    declared formula and the forward KL), and the beta of a generalized JSD, for each power of T (and each
    standard reduction, for beta). ``diagnose`` keeps those that reproduce every run."""
    runs = _fit_runs(preps)
    if not runs:
        return []
    p = runs[0]
    value, temp = np.asarray(p.obs.value, np.float64), p.ex.temperature
    out: list[Fitted] = []
    if value.ndim == 0:
        standard = {_divisor(r, p.shape) for r in _FIT_REDUCTIONS}
        for formula, k in itertools.product(dict.fromkeys((conv.formula, "exact")), _POWERS):
            d = float(np.sum(p.rows(formula, False)[0]) * temp**k / value)
            if math.isfinite(d) and d > 0 and all(abs(d - s) > 1e-6 * s for s in standard):
                # the round candidates first (a run computed in float32 fits D to ~1e-7): every run decides
                for c in dict.fromkeys((float(round(d)) or d, float(f"{d:.6g}"), d)):
                    out.append(Fitted(formula, f"fixed:{c:.17g}", k))
    reductions = _FIT_REDUCTIONS if value.ndim == 0 else ("per-token",)
    sums = np.array([np.sum(p.rows(jsd_name(b), False)[0]) for b in _BETA_GRID])
    for r, k in itertools.product(reductions, _POWERS):
        target = float(np.sum(value)) * _divisor(r, p.shape) / temp**k
        def gap(b: float, target: float = target) -> float:
            return float(np.sum(p.rows(jsd_name(b), False)[0])) - target

        for beta in _roots(gap, sums - target):
            out += [Fitted(jsd_name(round(beta, 2), 2), r, k), Fitted(jsd_name(beta), r, k)]
    return out


def _roots(f: Callable[[float], float], on_grid: F64) -> list[float]:
    """The roots of ``f`` on (0, 1) between sign changes of its values on ``_BETA_GRID``."""
    from scipy.optimize import brentq

    out = []
    for i in np.flatnonzero(np.sign(on_grid[:-1]) * np.sign(on_grid[1:]) <= 0):
        a, b = float(_BETA_GRID[i]), float(_BETA_GRID[i + 1])
        out.append(a if on_grid[i] == 0 else float(brentq(f, a, b, xtol=1e-14)))
    return out


def _touches_nan_rows(h: Hypothesis, p: _Prepared) -> bool:
    """The observation has rows whose value the NaN overlay of ``h`` decides (masked classes, NaN logits)."""
    return h.overlay != "none" and (has_masked_classes(p.obs.case) or bool(np.isnan(p.ex.rows).any()))


def _evidence(h: Hypothesis, preps: list[_Prepared], conv: Convention, framework: str) -> list[str]:
    """A few observations side by side: got, correct, predicted by ``h``; the most telling first."""
    correct = _expected(conv, framework)[0]
    plain = [p for p in preps if not has_masked_classes(p.obs.case) and not np.isnan(p.ex.rows).any()]
    plain.sort(key=lambda p: (len(p.shape) < 3, p.ex.temperature == 1.0))
    chosen: list[_Prepared] = []
    seen: set[tuple[int, float]] = set()
    for p in plain:
        if (len(p.shape), p.ex.temperature) not in seen and len(chosen) < 3:
            seen.add((len(p.shape), p.ex.temperature))
            chosen.append(p)
    chosen += [p for p in preps if _touches_nan_rows(h, p)][:1]
    lines = []
    for p in chosen:
        exp, pred = predict(correct, p).value, predict(h, p)
        shown = "any finite value" if np.any(pred.free) else _fmt(pred.value)
        lines.append(f"{p.obs.label}: got {_fmt(p.obs.value)}, correct {_fmt(exp)}, predicted {shown}"
                     f"{_ratio_text(p.obs.value, exp)}")  # fmt: skip
    warned = sorted({w for p in preps for w in p.obs.warnings})
    return lines + [f"the loss warned: {w}" for w in warned[:2]]


def _grad_note(h: Hypothesis, preps: list[_Prepared]) -> str:
    """Whether the gradient w.r.t. the student logits is the one ``h`` predicts (rows its NaN overlay decides aside)."""
    if _grad_model(h.formula, preps[0], h.clipped) is None:
        return "not modelled for this hypothesis"
    if any(p.obs.grad is None for p in preps):
        return "no gradient reaches the student logits (detached, or computed without gradient tracking)"
    runs = [p for p in preps if not _touches_nan_rows(h, p)]
    agree = sum(check_grad(h, p).ok for p in runs)
    return f"as predicted by this diagnosis in {'all ' if agree == len(runs) else ''}{agree} of {len(runs)} runs"


def _zero_where_nonzero(p: _Prepared) -> bool:
    """The gradient is exactly 0 where the exact one is finite and not 0 (JAX gives zeros, not None, through
    a stop_gradient)."""
    g, ref = p.obs.grad, exact_student_grad(p.ex.teacher, p.ex.student, p.ex.temperature)
    live = np.isfinite(ref) & (ref != 0)
    return g is not None and bool(live.any()) and bool(np.all(g[live] == 0))


def _gradient_only(preps: list[_Prepared], correct: Hypothesis) -> Diagnosis:
    """The value is right but the gradient is not: detached, NaN on masked classes, scaled, or otherwise."""
    checks = [check_grad(correct, p) for p in preps]
    evidence = [f"{p.obs.label}: gradient error/tolerance {c.worst:.3g}" for p, c in zip(preps, checks, strict=True)]
    if any(p.obs.grad is None or _zero_where_nonzero(p) for p in preps):
        bug = Factor("gradient", "no-gradient", "no gradient reaches the student logits: they are detached "
                     "(.detach(), torch.no_grad, tf.stop_gradient, jax.lax.stop_gradient) before the loss")  # fmt: skip
        return Diagnosis([bug], [], len(preps), len(preps), evidence=evidence[:3])
    nan_masked = [p for p in preps if has_masked_classes(p.obs.case) and p.obs.grad is not None
                  and np.any(np.isnan(p.obs.grad) & ~np.isnan(exact_student_grad(p.ex.teacher, p.ex.student,
                                                                                 p.ex.temperature)))]  # fmt: skip
    if nan_masked and len(nan_masked) == len(preps):
        bug = Factor("gradient", "nan-gradient-masked-vocab", "the value is finite but the gradient is NaN on "
                     "masked classes: a where()/masked branch that is NaN or inf there still back-propagates "
                     "0 · inf = NaN (mask the inputs of the branch, not only its output)")  # fmt: skip
        return Diagnosis([bug], [], len(preps), len(preps), evidence=evidence[:3])
    bug = Factor("gradient", "gradient-wrong", "the value is right, but its gradient w.r.t. the student logits is "
                 "not d(loss)/d(student logits): a custom backward, a straight-through or detach trick, or a "
                 "gradient scaled inside the loss")  # fmt: skip
    return Diagnosis([bug], [], 0, len(preps), [p.obs.label for p in preps], evidence=evidence[:4])


def _prepare(obs: Observation, framework: str) -> _Prepared:
    t64, s64 = obs.case.logits()
    t, s = widen(round_to(t64, obs.dtype)), widen(round_to(s64, obs.dtype))
    ex = Exact.of(t, s, obs.case.temperature)
    compute = obs.dtype
    if obs.value_dtype in DTYPE_NAMES and dtype_info(obs.value_dtype).unit_roundoff > dtype_info(compute).unit_roundoff:
        compute = obs.value_dtype  # computed in a narrower dtype (Keras: float64 inputs in float32)
    eps = float(round_to(np.asarray(oracle.KERAS_EPSILON), compute))
    return _Prepared(obs, ex, framework, compute, eps)


def check_loss(fn: LossFn, framework: str, conv: Convention | None = None, *,
               dtypes: Sequence[str] = DEFAULT_DTYPES, ndims: Sequence[int] = (2, 3),
               cases: Iterable[Case] | None = None, target: str = "") -> LossReport:  # fmt: skip
    """Run ``fn`` on the grid (``default_cases(ndims)`` unless ``cases``) in ``dtypes`` and judge it.

    See the module docstring. Raises ``UsageError`` on bad input (an unknown framework or dtype, a
    signature that cannot take the declared inputs, a loss that raises on every run).
    """
    conv = conv or Convention()
    if framework not in FRAMEWORKS:
        raise UsageError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype {d!r}; expected some of {', '.join(DTYPE_NAMES)}")
    check_signature(fn, conv)
    grid = list(cases) if cases is not None else default_cases(ndims)
    if conv.temperature is not None:
        grid = at_temperature(grid, conv.temperature)
    if not grid:
        raise UsageError("no case to run: the selection of shapes is empty")
    try:  # start the framework through its adapter: thread caps, GPU memory growth (as the suite does)
        REGISTRY[framework].devices()
    except RuntimeError:  # already started by other code: its settings stay (the cases are tiny anyway)
        pass
    with REGISTRY[framework].small_work():
        observations = [observe(fn, framework, conv, c, d) for c in grid for d in dtypes]
    errors = [o for o in observations if o.error]
    if errors and len(errors) == len(observations):
        raise UsageError(f"the loss raised on every run ({errors[0].label}: {errors[0].error}); check --framework, "
                         "--inputs and --takes")  # fmt: skip
    preps = [_prepare(o, framework) for o in observations]
    correct = _expected(conv, framework)
    verdicts = [_judge(p, correct, conv.masked_vocab or not has_masked_classes(p.obs.case)) for p in preps]
    notes = [f"raised on {o.label}: {o.error}" for o in errors[:3]]
    report = LossReport(target or getattr(fn, "__qualname__", repr(fn)), framework, conv, verdicts, None, notes)
    judged_value_bad = any(v.judged and not v.value_ok for v in verdicts)
    if judged_value_bad:
        report.diagnosis = diagnose(preps, conv, framework)
    elif any(v.judged and not v.grad_ok for v in verdicts):
        bad = [p for p, v in zip(preps, verdicts, strict=True) if v.judged and not v.grad_ok]
        report.diagnosis = _gradient_only(bad, correct[0])
    if not judged_value_bad and any(not v.value_ok for v in verdicts):  # only unjudged masked runs are off
        diag = diagnose(preps, conv, framework)
        report.notes.append(
            f"on logits with masked (-inf) classes: {' + '.join(diag.names) or 'unexplained values'}: "
            + "; ".join(f.text for f in diag.bugs + diag.excused)
            + ". Pass --masked-vocab (masked_vocab=True) if your logits can hold -inf, to make this a failure")
    clipped = [(p, v) for p, v in zip(preps, verdicts, strict=True) if v.clipped and v.ok]
    clip = REGISTRY[framework].user_losses_clip
    if clipped and clip:
        gaps = [float(np.max(np.abs(v.expected - e) / np.abs(e))) for p, v in clipped if v.expected is not None
                for e in [predict(correct[0], p).value] if np.all(np.isfinite(e) & (e != 0))]  # fmt: skip
        report.notes.append(f"{clip}: {DIFFERENCES[clip]}. In {len(clipped)} runs the loss is the "
                            "framework's clipped formula (value and gradient, within rounding), not the exact "
                            f"KL: accepted as correct; its relative gap to the exact KL there is up to "
                            f"{max(gaps, default=0.0):.2g}")  # fmt: skip
    narrowed = sorted({f"{p.obs.dtype} inputs computed in {p.compute}" for p in preps if p.compute != p.obs.dtype})
    report.notes += [f"{n} (the result dtype): judged with {n.split()[-1]} tolerances" for n in narrowed]
    return report


# ------------------------------------------------------------------------ loading the user's loss


def check_signature(fn: LossFn, conv: Convention) -> None:
    """Raise ``UsageError`` unless ``fn`` accepts the declared inputs positionally."""
    if not callable(fn):
        raise UsageError(f"{fn!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C functions: nothing to check before calling
    try:
        sig.bind(*range(len(conv.inputs)))
    except TypeError:
        name = getattr(fn, "__name__", "the loss")
        hint = "set --inputs to its arguments in order"
        two = [n for n in conv.inputs if n != "temperature"]
        if len(two) < len(conv.inputs) and _binds(sig, len(two)):  # a loss with no temperature argument
            hint += (f"; it takes {len(two)}: for a loss without a temperature argument, give the one it uses, "
                     f"e.g. --temperature 1 --inputs {','.join(f'{r}_logits' for r in two)}")  # fmt: skip
        raise UsageError(f"{name}{sig} cannot take the {len(conv.inputs)} declared inputs "
                         f"({','.join(conv.inputs)}); {hint}") from None


def _binds(sig: inspect.Signature, n: int) -> bool:
    """``sig`` accepts ``n`` positional arguments."""
    try:
        sig.bind(*range(n))
    except TypeError:
        return False
    return True


def imported_frameworks(path: Path) -> set[str]:
    """Frameworks a Python file imports (``keras`` counts as TensorFlow), from its syntax tree."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {_error(e)}") from None
    found = set()
    for node in ast.walk(tree):
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods = [node.module]
        for m in mods:
            top = m.split(".")[0]
            if top in _IMPORT_FRAMEWORK:
                found.add(_IMPORT_FRAMEWORK[top])
    return found


def infer_framework(path: Path | None, given: str | None) -> str:
    """``given``, or the one framework the file imports; ``UsageError`` when that is ambiguous."""
    if given:
        if given not in FRAMEWORKS:
            raise UsageError(f"unknown framework {given!r}; expected one of {', '.join(FRAMEWORKS)}")
        return given
    found = imported_frameworks(path) if path else set()
    if len(found) != 1:
        what = "none of" if not found else f"more than one of ({', '.join(sorted(found))})"
        raise UsageError(f"cannot infer the framework: {path or 'the loss'} imports {what} torch, "
                         f"tensorflow/keras, jax; pass --framework {'|'.join(FRAMEWORKS)}")  # fmt: skip
    return found.pop()


def function_framework(fn: LossFn, given: str | None = None) -> str:
    """``given``, or the framework the function's source file imports."""
    try:
        src = inspect.getsourcefile(fn)
    except TypeError:
        src = None
    return infer_framework(Path(src) if src else None, given)


def load_target(target: str) -> tuple[LossFn, Path | None]:
    """``PATH/TO/FILE.py:FUNCTION`` or ``package.module:FUNCTION`` -> (the function, its file)."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"expected FILE.py:FUNCTION or module:function, got {target!r}")
    path = Path(where)
    if where.endswith(".py") or path.exists() or "/" in where or "\\" in where:
        if not path.is_file():
            raise UsageError(f"file not found: {where}")
        module = _exec_file(path)
        origin: Path | None = path
    else:
        try:
            spec = importlib.util.find_spec(where)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot find module {where!r}: {_error(e)}") from None
        if spec is None:
            raise UsageError(f"module not found: {where}")
        try:
            module = importlib.import_module(where)
        except Exception as e:  # the user's module: any exception is a usage problem here
            raise UsageError(f"importing {where} failed: {_error(e)}") from None
        origin = Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)  # fmt: skip
        raise UsageError(f"{where} has no function {name!r}" + (f"; it defines {', '.join(public)}" if public else ""))
    if not callable(fn):
        raise UsageError(f"{where}:{name} is not a function")
    return fn, origin


def _exec_file(path: Path) -> Any:
    name = f"_klparity_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the file's own helper modules next to it
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any exception is a usage problem here
        sys.modules.pop(name, None)
        raise UsageError(f"running {path} failed: {_error(e)}") from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module
