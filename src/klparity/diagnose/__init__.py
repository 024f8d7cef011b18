"""Check a user's distillation loss against the exact KL divergence, and name the bug when it is wrong.

``check_loss(fn, framework, convention)`` runs the user's function on a grid of deterministic cases
(``klparity.numerics.cases`` families; float32 and float64; (B, C) and (B, S, C) shapes; temperatures 0.5, 1,
2 and 4; classes masked with ``-inf``; a NaN logit), compares its value with the float64 oracle
(``oracle.kl_from_logits`` reduced as declared, times T² unless declared otherwise) and its gradient
w.r.t. the student logits with the analytic one (``gradients.exact_student_grad``), within the
derived tolerances of ``klparity.numerics.errormodel``.

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

Modules: ``conventions`` (what the user declares), ``records`` (what the API records say: reductions and
their wording), ``observe`` (the grid and one run), ``catalogue`` (the known bugs and hypotheses),
``prediction`` (a hypothesis's value), ``gradients`` (its gradient), ``fitting`` (solved parameters),
``verdict`` (judging and diagnosing), ``report`` (the findings and their text), ``runner`` (``check_loss``),
``loading`` (the user's function and its framework).
"""

from __future__ import annotations

from klparity.diagnose.catalogue import expected_hypotheses as _expected
from klparity.diagnose.catalogue import hypotheses
from klparity.diagnose.conventions import (
    DEFAULT_DTYPES,
    DEFAULT_EXPECT,
    DEFAULT_INPUTS,
    Convention,
    LossFn,
    UsageError,
)
from klparity.diagnose.loading import function_framework, imported_frameworks, infer_framework, load_target
from klparity.diagnose.observe import Observation, default_cases
from klparity.diagnose.prediction import matches, predict
from klparity.diagnose.prediction import prepare as _prepare
from klparity.diagnose.report import LossReport
from klparity.diagnose.runner import check_loss

__all__ = [
    "DEFAULT_DTYPES",
    "DEFAULT_EXPECT",
    "DEFAULT_INPUTS",
    "Convention",
    "LossFn",
    "LossReport",
    "Observation",
    "UsageError",
    "_expected",
    "_prepare",
    "check_loss",
    "default_cases",
    "function_framework",
    "hypotheses",
    "imported_frameworks",
    "infer_framework",
    "load_target",
    "matches",
    "predict",
]
