"""Judging each run against the declared convention, and naming the bug: the hypothesis with the fewest
bugs that reproduces every run (or the closest), its evidence, and the gradient-only failures.
"""

from __future__ import annotations

import math

import numpy as np

from klparity.diagnose.catalogue import Factor, Hypothesis, expected_hypotheses, hypotheses, judged_bugs
from klparity.diagnose.conventions import Convention
from klparity.diagnose.fitting import fit_parameters
from klparity.diagnose.gradients import GradCheck, check_grad, grad_model
from klparity.diagnose.observe import has_masked_classes
from klparity.diagnose.prediction import Prepared, matches, predict, worst
from klparity.diagnose.records import wording
from klparity.diagnose.report import Diagnosis, RunVerdict, fmt, ratio_text
from klparity.numerics.exact_grads import exact_student_grad


def judge(prep: Prepared, correct: list[Hypothesis], judged: bool) -> RunVerdict:
    """The verdict on one run: right if one of the correct hypotheses predicts its value and gradient."""
    obs = prep.obs
    best: RunVerdict | None = None
    for h in correct:
        pred = predict(h, prep)
        value_ok = obs.error is None and matches(obs.value, pred)
        value_worst = worst(obs.value, pred) if obs.value is not None else math.inf
        gc = check_grad(h, prep) if obs.error is None else GradCheck(False, math.inf, None)
        v = RunVerdict(obs, judged, value_ok, gc.ok, value_worst, gc.worst, pred.value, h.clipped)
        if v.ok:
            return v
        best = best or v
    assert best is not None
    return best


def diagnose(preps: list[Prepared], conv: Convention, framework: str) -> Diagnosis:
    """The hypothesis with the fewest bugs that reproduces every observation's value (or the closest)."""
    valid = [p for p in preps if p.obs.error is None]
    labels = [p.obs.label for p in valid]

    def rank(h: Hypothesis) -> tuple[int, int, bool]:
        return len(judged_bugs(h, conv)), len(h.bugs()), h.clipped

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
    judged = judged_bugs(chosen, conv)
    excused = [f for f in chosen.bugs() if f not in judged]
    alternatives = [h for h in best[1:] if h.clipped == chosen.clipped]
    return Diagnosis(judged, excused, explained, len(valid), unexplained, alternatives,
                     _evidence(chosen, valid, conv, framework), _grad_note(chosen, valid))  # fmt: skip


def _touches_nan_rows(h: Hypothesis, p: Prepared) -> bool:
    """The observation has rows whose value the NaN overlay of ``h`` decides (masked classes, NaN logits)."""
    return h.overlay != "none" and (has_masked_classes(p.obs.case) or bool(np.isnan(p.ex.rows).any()))


def _evidence(h: Hypothesis, preps: list[Prepared], conv: Convention, framework: str) -> list[str]:
    """A few observations side by side: got, correct, predicted by ``h``; the most telling first."""
    correct = expected_hypotheses(conv, framework)[0]
    plain = [p for p in preps if not has_masked_classes(p.obs.case) and not np.isnan(p.ex.rows).any()]
    plain.sort(key=lambda p: (len(p.shape) < 3, p.ex.temperature == 1.0))
    chosen: list[Prepared] = []
    seen: set[tuple[int, float]] = set()
    for p in plain:
        if (len(p.shape), p.ex.temperature) not in seen and len(chosen) < 3:
            seen.add((len(p.shape), p.ex.temperature))
            chosen.append(p)
    chosen += [p for p in preps if _touches_nan_rows(h, p)][:1]
    lines = []
    for p in chosen:
        exp, pred = predict(correct, p).value, predict(h, p)
        shown = "any finite value" if np.any(pred.free) else fmt(pred.value)
        lines.append(f"{p.obs.label}: got {fmt(p.obs.value)}, correct {fmt(exp)}, predicted {shown}"
                     f"{ratio_text(p.obs.value, exp)}")  # fmt: skip
    warned = sorted({w for p in preps for w in p.obs.warnings})
    return lines + [f"the loss warned: {w}" for w in warned[:2]]


def _grad_note(h: Hypothesis, preps: list[Prepared]) -> str:
    """Whether the gradient w.r.t. the student logits is the one ``h`` predicts (rows its NaN overlay decides aside)."""
    if grad_model(h.formula, preps[0], h.clipped) is None:
        return "not modelled for this hypothesis"
    if any(p.obs.grad is None for p in preps):
        return "no gradient reaches the student logits (detached, or computed without gradient tracking)"
    runs = [p for p in preps if not _touches_nan_rows(h, p)]
    agree = sum(check_grad(h, p).ok for p in runs)
    return f"as predicted by this diagnosis in {'all ' if agree == len(runs) else ''}{agree} of {len(runs)} runs"


def _zero_where_nonzero(p: Prepared) -> bool:
    """The gradient is exactly 0 where the exact one is finite and not 0 (JAX gives zeros, not None, through
    a stop_gradient)."""
    g, ref = p.obs.grad, exact_student_grad(p.ex.teacher, p.ex.student, p.ex.temperature)
    live = np.isfinite(ref) & (ref != 0)
    return g is not None and bool(live.any()) and bool(np.all(g[live] == 0))


def gradient_only(preps: list[Prepared], correct: Hypothesis) -> Diagnosis:
    """The value is right but the gradient is not: detached, NaN on masked classes, scaled, or otherwise."""
    checks = [check_grad(correct, p) for p in preps]
    evidence = [f"{p.obs.label}: gradient error/tolerance {c.worst:.3g}" for p, c in zip(preps, checks, strict=True)]
    if any(p.obs.grad is None or _zero_where_nonzero(p) for p in preps):
        bug = Factor("gradient", "no-gradient", "no gradient reaches the student logits: they are detached "
                     f"({wording('no-gradient', ', ')}) before the loss")  # fmt: skip
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
