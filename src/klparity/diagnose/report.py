"""What the check found, and its text: the verdict on each run, the diagnosis with its evidence, and the
report the command prints (``LossReport.text``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from klparity.diagnose.catalogue import Factor, Hypothesis
from klparity.diagnose.conventions import Convention
from klparity.diagnose.observe import Observation

F64 = NDArray[np.float64]


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
    clipped: bool  #: matched only through the framework's clipping

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
                lines += diagnosis_lines(self.diagnosis)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def diagnosis_lines(d: Diagnosis) -> list[str]:
    """The diagnosis in the report: the bugs named and explained, the evidence, the gradient."""
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


def fmt(x: F64 | None) -> str:
    """A value in a line of evidence: a scalar, or the first entries of an array and its shape."""
    if x is None:
        return "-"
    a = np.asarray(x)
    if a.ndim == 0:
        return f"{float(a):.7g}"
    flat = ", ".join(f"{float(v):.4g}" for v in a.ravel()[:3])
    return f"[{flat}{', …' if a.size > 3 else ''}] (shape {a.shape})"


def ratio_text(obs: F64 | None, ref: F64 | None) -> str:
    """``; got/correct = q`` (and ``= 1/n`` when small) for two finite nonzero scalars, else empty."""
    if obs is None or ref is None or np.ndim(obs) or np.ndim(ref):
        return ""
    o, r = float(obs), float(ref)
    if not (math.isfinite(o) and math.isfinite(r)) or r == 0 or o == 0:
        return ""
    q = o / r
    return f"; got/correct = {q:.6g}" + (f" = 1/{1 / q:.6g}" if abs(q) < 0.5 else "")
