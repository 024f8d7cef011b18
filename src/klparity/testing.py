"""Assert, in your own test suite, that a distillation loss computes what it should.

    from klparity.testing import assert_distillation_loss

    def test_kd_loss():
        assert_distillation_loss(my_kd_loss)  # (student_logits, teacher_logits, temperature) -> T² · mean KL

The framework is inferred from what the function's file imports. On failure the test fails with the
diagnosis (which known bug explains the numbers, with the evidence); ``klparity check`` prints the same.
With the klparity plugin loaded, the fixture ``klparity_check_loss`` is this function.
"""

from __future__ import annotations

from collections.abc import Sequence

from klparity.diagnose import (
    DEFAULT_DTYPES,
    DEFAULT_EXPECT,
    DEFAULT_INPUTS,
    Convention,
    LossFn,
    LossReport,
    check_loss,
    function_framework,
)

__all__ = ["LossReport", "assert_distillation_loss", "check_distillation_loss"]


def check_distillation_loss(
    fn: LossFn,
    *,
    framework: str | None = None,
    inputs: str = DEFAULT_INPUTS,
    takes: str = "logits",
    expect: str = DEFAULT_EXPECT,
    masked_vocab: bool = False,
    temperature: float | None = None,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    ndims: Sequence[int] = (2, 3),
) -> LossReport:
    """Run the check and return its report (``report.ok``, ``report.bug_names``, ``report.text()``).

    The keywords are those of ``klparity check``: ``inputs`` the argument order (comma list of
    student_*, teacher_*, temperature), ``takes`` logits / probs / log_probs, ``expect`` a comma list
    of a reduction (mean, batch, sum, per-token) and t2 / no-t2, ``masked_vocab`` when the logits can
    hold -inf, ``temperature`` the fixed T of a loss that does not take one. Raises
    ``klparity.diagnose.UsageError`` (a ``ValueError``) on a bad convention or signature.
    """
    conv = Convention.parse(inputs, takes, expect, masked_vocab, temperature)
    fw = function_framework(fn, framework)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return check_loss(fn, fw, conv, dtypes=dtypes, ndims=ndims, target=name)


def assert_distillation_loss(
    fn: LossFn,
    *,
    framework: str | None = None,
    inputs: str = DEFAULT_INPUTS,
    takes: str = "logits",
    expect: str = DEFAULT_EXPECT,
    masked_vocab: bool = False,
    temperature: float | None = None,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    ndims: Sequence[int] = (2, 3),
) -> LossReport:
    """Like ``check_distillation_loss``, but raise ``AssertionError`` with the diagnosis when the loss is wrong."""
    __tracebackhide__ = True  # pytest: show the diagnosis, not this frame
    report = check_distillation_loss(fn, framework=framework, inputs=inputs, takes=takes, expect=expect,
                                     masked_vocab=masked_vocab, temperature=temperature, dtypes=dtypes,
                                     ndims=ndims)  # fmt: skip
    if not report.ok:
        raise AssertionError(report.text())
    return report
