"""The catalogue of known bugs: each a value of one factor of the computation (the formula, the reduction,
the temperature factor, the NaN handling), and the hypotheses, combinations of one value per factor.

The words of each bug are the checker's; how it arises with a given framework's API is the API record's
(``records.wording``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from klparity.diagnose.conventions import DECLARABLE, REDUCTIONS, Convention, declarable_words, jsd_beta
from klparity.diagnose.records import api_reduction, fixed_divisor, wording
from klparity.frameworks import REGISTRY


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
           f"teacher and student exchanged ({wording('reverse-kl', '; ')}), or reverse KL on purpose (declare it "
           "with --expect reverse-kl)"),
    Factor("cross-entropy", "cross-entropy-not-kl", "the value is the cross-entropy H(teacher, student) = "
           "KL(teacher‖student) + H(teacher): off by the teacher's entropy (times the temperature factor), "
           "which has no gradient in the student, so the gradient is right "
           f"({wording('cross-entropy-not-kl', ', ')})"),
    Factor("probs-input", "probs-as-log-probs", "probabilities passed where log-probabilities are expected: "
           f"{wording('probs-as-log-probs', '; ')}"),
    Factor("log-target", "log-probs-as-target", wording("log-probs-as-target", "; ")),
    Factor("log-probs-clipped", "log-probs-as-probs", "log-probabilities passed to a loss that takes "
           f"probabilities ({wording('log-probs-as-probs', ', ')}): every value is clipped to 1e-7 and the loss is 0"),
    Factor("logits-clipped", "logits-as-probs", "logits / T passed to a loss that takes probabilities "
           f"({wording('logits-as-probs', ', ')}) without a softmax: they are clipped to [1e-7, 1]"),
    Factor("student-T", "student-temperature-only", "temperature applied to the student only: "
           "KL(softmax(t) ‖ softmax(s/T))"),
    Factor("teacher-T", "teacher-temperature-only", "temperature applied to the teacher only: "
           "KL(softmax(t/T) ‖ softmax(s))"),
    Factor("no-T", "temperature-ignored", "temperature applied to neither softmax: KL(softmax(t) ‖ softmax(s))"),
)}  # fmt: skip

#: Formulas that are probability-space KLs, with a clipped variant (``Hypothesis.clipped``) for a framework
#: whose own loss clips probabilities (``Adapter.user_losses_clip``: that clipping of the exact formula
#: counts as correct).
CLIPPABLE: Final = ("exact", "swapped", "student-T", "teacher-T", "no-T")

#: NaN behaviours laid over a formula; those on masked classes count only with ``masked_vocab``.
MASKED_OVERLAYS: Final = ("masked-nan", "zero-prob-nan")
OVERLAYS: Final[dict[str, Factor]] = {f.name: f for f in (
    Factor("none", "", "NaN exactly where the exact KL is NaN"),
    Factor("masked-nan", "nan-masked-vocab", "NaN on every row with a class masked (-inf) in both teacher and "
           f"student: 0 · log 0 computed as 0 · (−inf) ({wording('nan-masked-vocab', ' / ')} on a masked "
           "vocabulary); the exact KL there is finite"),
    Factor("zero-prob-nan", "nan-zero-teacher-prob", "NaN on every row where the teacher gives a class "
           "probability 0 (masked vocabulary, one-hot targets): p · (log p − log q) evaluated at p = 0 as "
           "0 · (−inf) instead of 0"),
    Factor("nan-swallowed", "nan-swallowed", "a NaN logit gives a finite loss: NaN is swallowed (nan_to_num, "
           "where(p > 0, …), masking) and a diverged teacher or student goes unnoticed"),
)}  # fmt: skip

#: Reductions a loss can apply (``records.divisor`` says what each divides by): name -> (bug, what it does).
REDUCTION_BUGS: Final = {
    "elements": ("mean-over-elements", f"divides by every element (B·C, or B·S·C), not by the rows: "
                 f"{api_reduction('elements')}, or a mean over the class axis too, makes the loss C times too small"),
    "batch": ("divides-by-B", f"divides by B = shape[0]: {api_reduction('batch')} on (B, S, C) input takes it "
              "for a batch of B, so the mean over B·S tokens comes out S times too large"),
    "mean": ("divides-by-all-rows", "divides by all rows (B·S for (B, S, C)): a mean over every token"),
    "sum": ("sum-over-rows", "sums the rows without dividing (reduction='sum')"),
    "per-token": ("unreduced", "returns one value per row: no reduction"),
}  # fmt: skip

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

#: The powers of T a loss may multiply by.
POWERS: Final = (2, 0, 1, 4)


def formula_words(formula: str) -> str:
    """What a formula computes, in words (for the declared one, and the report)."""
    return declarable_words(formula) or FORMULAS[formula].text


def _formula_factor(expected: str, actual: str) -> Factor:
    """The formula factor of a hypothesis: no bug when it is the declared formula."""
    if actual == expected:
        return Factor(actual, "", formula_words(actual))
    if jsd_beta(actual) is not None:
        return Factor(actual, "jsd", f"the value is the {formula_words(actual)} ({wording('jsd', ', ')}), "
                      f"not the declared {formula_words(expected)}")  # fmt: skip
    f = FORMULAS[actual]
    if expected != "exact" and actual in DECLARABLE:
        return Factor(actual, f.bug, f"the value is {formula_words(actual)}, not the declared "
                      f"{formula_words(expected)}")  # fmt: skip
    return f


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
                      f"{REDUCTION_BUGS[actual][1]}")  # fmt: skip
    name, text = REDUCTION_BUGS[actual]
    return Factor(actual, name, f"{text} (declared: {REDUCTIONS[expected]})")


def _scale_factor(expected: int, power: int) -> Factor:
    if power == expected:
        return Factor(f"T^{power}", "", "T²" if power == 2 else "no temperature factor")
    name, text = _SCALE_BUGS[expected][power]
    return Factor(f"T^{power}", name, text)


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
    clips = bool(REGISTRY[framework].user_losses_clip)
    formulas = [(f, False) for f in FORMULAS]
    if jsd_beta(conv.formula) is not None:
        formulas.append((conv.formula, False))
    if clips:
        formulas += [(f, True) for f in CLIPPABLE]
    combos = [(f, clipped, r, k) for (f, clipped), r, k in itertools.product(formulas, REDUCTION_BUGS, POWERS)]
    combos += [(f.formula, clipped, f.reduction, f.power) for f in fitted for clipped in (False, True)
               if not clipped or (clips and f.formula in CLIPPABLE)]  # fmt: skip
    out = [
        Hypothesis(_formula_factor(conv.formula, f), clipped, _reduction_factor(conv.reduction, r),
                   _scale_factor(expected_power, k), o)
        for (f, clipped, r, k), o in itertools.product(dict.fromkeys(combos), OVERLAYS)
    ]  # fmt: skip
    return sorted(out, key=lambda h: (len(h.bugs()), h.clipped))


def expected_hypotheses(conv: Convention, framework: str) -> list[Hypothesis]:
    """The correct hypotheses: the declared formula, and for a framework whose loss clips probabilities also
    the clipped version of it."""
    power = 2 if conv.t2 else 0
    red, scale = _reduction_factor(conv.reduction, conv.reduction), _scale_factor(power, power)
    form = _formula_factor(conv.formula, conv.formula)
    out = [Hypothesis(form, False, red, scale, "none")]
    if REGISTRY[framework].user_losses_clip and conv.formula in CLIPPABLE:
        out.append(Hypothesis(form, True, red, scale, "none"))
    return out


def judged_bugs(h: Hypothesis, conv: Convention) -> list[Factor]:
    """The bugs of ``h`` that count: NaN on masked classes only with a declared masked vocabulary."""
    return [f for f in h.bugs() if conv.masked_vocab or f.name not in MASKED_OVERLAYS]
