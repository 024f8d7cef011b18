"""``check_loss``: run the user's loss on the grid through its framework's adapter, judge every run against
the declared convention, diagnose the failures, and gather the notes of the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from klparity.apis import DIFFERENCES
from klparity.diagnose.catalogue import expected_hypotheses
from klparity.diagnose.conventions import DEFAULT_DTYPES, Convention, LossFn, UsageError
from klparity.diagnose.loading import check_signature
from klparity.diagnose.observe import at_temperature, default_cases, has_masked_classes, observe
from klparity.diagnose.prediction import predict, prepare
from klparity.diagnose.records import FRAMEWORKS
from klparity.diagnose.report import LossReport
from klparity.diagnose.verdict import diagnose, gradient_only, judge
from klparity.frameworks import REGISTRY
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import DTYPE_NAMES


def check_loss(fn: LossFn, framework: str, conv: Convention | None = None, *,
               dtypes: Sequence[str] = DEFAULT_DTYPES, ndims: Sequence[int] = (2, 3),
               cases: Iterable[Case] | None = None, target: str = "") -> LossReport:  # fmt: skip
    """Run ``fn`` on the grid (``default_cases(ndims)`` unless ``cases``) in ``dtypes`` and judge it.

    See the package docstring. Raises ``UsageError`` on bad input (an unknown framework or dtype, a
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
    preps = [prepare(o, framework) for o in observations]
    correct = expected_hypotheses(conv, framework)
    verdicts = [judge(p, correct, conv.masked_vocab or not has_masked_classes(p.obs.case)) for p in preps]
    notes = [f"raised on {o.label}: {o.error}" for o in errors[:3]]
    report = LossReport(target or getattr(fn, "__qualname__", repr(fn)), framework, conv, verdicts, None, notes)
    judged_value_bad = any(v.judged and not v.value_ok for v in verdicts)
    if judged_value_bad:
        report.diagnosis = diagnose(preps, conv, framework)
    elif any(v.judged and not v.grad_ok for v in verdicts):
        bad = [p for p, v in zip(preps, verdicts, strict=True) if v.judged and not v.grad_ok]
        report.diagnosis = gradient_only(bad, correct[0])
    if not judged_value_bad and any(not v.value_ok for v in verdicts):  # only unjudged masked runs are off
        diag = diagnose(preps, conv, framework)
        report.notes.append(
            f"on logits with masked (-inf) classes: {' + '.join(diag.names) or 'unexplained values'}: "
            + "; ".join(f.text for f in diag.bugs + diag.excused)
            + ". Pass --masked-vocab (masked_vocab=True) if your logits can hold -inf, to make this a failure"
        )
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
