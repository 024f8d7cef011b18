"""``klparity check``: a correct distillation loss passes, and each known bug is named, in torch and in Keras.

The losses live in ``tests/unit/losses/`` (one correct version and one per bug, per framework). Each
test runs the checker's whole grid (float32 and float64, (B, C) and (B, S, C), four temperatures,
masked classes, a NaN logit) on one of them and asserts the verdict and the name of the diagnosis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klparity import cli
from klparity.diagnose import (
    Convention,
    LossReport,
    Observation,
    UsageError,
    _expected,
    _prepare,
    check_loss,
    default_cases,
    hypotheses,
    imported_frameworks,
    infer_framework,
    load_target,
    matches,
    predict,
)
from klparity.testing import assert_distillation_loss, check_distillation_loss

LOSSES = Path(__file__).parent / "losses"
TORCH_FILE = LOSSES / "torch_losses.py"
KERAS_FILE = LOSSES / "keras_losses.py"
JAX_FILE = LOSSES / "jax_losses.py"


def _fn(path: Path, name: str) -> Callable[..., Any]:
    fn, _ = load_target(f"{path}:{name}")
    return fn


def _check(path: Path, name: str, framework: str, **conv: Any) -> LossReport:
    return check_loss(_fn(path, name), framework, Convention(**conv), target=name)


def _bugs(report: LossReport) -> list[str]:
    assert report.diagnosis is not None, report.text()
    return [f.bug for f in report.diagnosis.bugs]


@pytest.fixture(scope="module")
def torch_available() -> None:
    pytest.importorskip("torch")


@pytest.fixture(scope="module")
def keras_available() -> None:
    pytest.importorskip("tensorflow")


# ------------------------------------------------------------------------------------- torch

TORCH_BUGS = [
    ("reduction_mean", "mean-over-elements"),
    ("swapped", "reverse-kl"),
    ("reverse_kl", "reverse-kl"),
    ("cross_entropy", "cross-entropy-not-kl"),
    ("fixed_seq_len", "fixed-divisor"),
    ("probs_as_log_probs", "probs-as-log-probs"),
    ("log_target_without_flag", "log-probs-as-target"),
    ("student_temperature_only", "student-temperature-only"),
    ("teacher_temperature_only", "teacher-temperature-only"),
    ("t2_forgotten", "t2-forgotten"),
    ("t2_twice", "t2-applied-twice"),
    ("batchmean_3d", "divides-by-B"),
    ("detached", "no-gradient"),
    ("swallows_nan", "nan-swallowed"),
]


@pytest.mark.usefixtures("torch_available")
def test_torch_distilbert_loss_passes_and_notes_nan_on_masked_vocabulary() -> None:
    report = _check(TORCH_FILE, "distilbert", "torch")
    assert report.ok and report.diagnosis is None, report.text()
    assert len(report.verdicts) == 20 and sum(v.judged for v in report.verdicts) == 14
    assert any("nan-masked-vocab" in n for n in report.notes), report.notes


@pytest.mark.usefixtures("torch_available")
def test_torch_distilbert_loss_fails_on_a_declared_masked_vocabulary() -> None:
    report = _check(TORCH_FILE, "distilbert", "torch", masked_vocab=True)
    assert not report.ok
    assert _bugs(report) == ["nan-masked-vocab"]
    fixed = _check(TORCH_FILE, "masked_safe", "torch", masked_vocab=True)
    assert fixed.ok, fixed.text()


@pytest.mark.usefixtures("torch_available")
@pytest.mark.parametrize("name,bug", TORCH_BUGS)
def test_torch_bug_is_named(name: str, bug: str) -> None:
    report = _check(TORCH_FILE, name, "torch")
    assert not report.ok
    assert _bugs(report) == [bug], report.text()
    assert report.diagnosis is not None and report.diagnosis.complete, report.text()
    assert f"diagnosis: {bug}" in report.text()


@pytest.mark.usefixtures("torch_available")
def test_torch_mean_reduction_evidence_names_the_factor_and_the_warning() -> None:
    text = _check(TORCH_FILE, "reduction_mean", "torch").text()
    assert "got/correct = 0.02 = 1/50" in text  # C = 50 classes
    assert "the loss warned: UserWarning: reduction: 'mean' divides the total loss" in text
    assert "gradient: as predicted by this diagnosis in all" in text


# ------------------------------------------------------------------------------------- Keras

KERAS_BUGS = [
    ("mean_over_elements", "mean-over-elements"),
    ("swapped", "reverse-kl"),
    ("probs_as_log_probs", "probs-as-log-probs"),
    ("student_temperature_only", "student-temperature-only"),
    ("teacher_temperature_only", "teacher-temperature-only"),
    ("t2_forgotten", "t2-forgotten"),
    ("t2_twice", "t2-applied-twice"),
    ("sum_over_batch_3d", "divides-by-B"),
    ("log_probs_as_probs", "log-probs-as-probs"),
    ("logits_as_probs", "logits-as-probs"),
    ("cross_entropy", "cross-entropy-not-kl"),
    ("fixed_batch_size", "fixed-divisor"),
]


@pytest.mark.usefixtures("keras_available")
def test_keras_kldivergence_loss_passes_with_its_clipping_noted() -> None:
    report = _check(KERAS_FILE, "kldivergence", "tensorflow")
    assert report.ok, report.text()
    assert any(v.clipped for v in report.verdicts)  # T = 0.5: probabilities below 1e-7 are clipped
    assert any(n.startswith("keras.clip_epsilon") for n in report.notes)
    assert any("float64 inputs computed in float32" in n for n in report.notes)


@pytest.mark.usefixtures("keras_available")
def test_keras_log_space_loss_is_exact_also_on_a_masked_vocabulary() -> None:
    report = _check(KERAS_FILE, "log_space", "tensorflow", masked_vocab=True)
    assert report.ok and not any(v.clipped for v in report.verdicts), report.text()


@pytest.mark.usefixtures("keras_available")
@pytest.mark.parametrize("name,bug", KERAS_BUGS)
def test_keras_bug_is_named(name: str, bug: str) -> None:
    report = _check(KERAS_FILE, name, "tensorflow")
    assert not report.ok
    assert _bugs(report) == [bug], report.text()
    assert report.diagnosis is not None and report.diagnosis.complete, report.text()


@pytest.mark.usefixtures("keras_available")
def test_keras_two_bugs_are_named_together() -> None:
    report = _check(KERAS_FILE, "mean_over_elements_t2_forgotten", "tensorflow")
    assert _bugs(report) == ["mean-over-elements", "t2-forgotten"], report.text()
    assert "gradient: as predicted by this diagnosis in all" in report.text()


@pytest.mark.usefixtures("keras_available")
def test_keras_naive_formula_is_nan_on_zero_teacher_probabilities() -> None:
    report = _check(KERAS_FILE, "naive_log_space", "tensorflow", masked_vocab=True)
    assert not report.ok
    assert _bugs(report) == ["nan-zero-teacher-prob"], report.text()
    assert _check(KERAS_FILE, "naive_log_space", "tensorflow").ok  # not judged without a masked vocabulary


# ---------------------------------------------------------------------- precision and the grid


@pytest.mark.usefixtures("torch_available")
def test_small_drifts_fail_unexplained() -> None:
    distilbert = _fn(TORCH_FILE, "distilbert")

    def drift(s: Any, t: Any, temp: float) -> Any:  # 1e-4 relative, float32 and float64
        return distilbert(s, t, temp) * (1 + 1e-4)

    def through_float32(s: Any, t: Any, temp: float) -> Any:
        return distilbert(s.float(), t.float(), temp).to(s.dtype)

    for fn, dtype in ((drift, "float32"), (through_float32, "float64")):
        report = check_loss(fn, "torch", dtypes=(dtype,))
        assert not report.ok, dtype
        assert report.diagnosis is not None and not report.diagnosis.complete, report.text()
        assert "no known bug explains every run" in report.text()


def test_every_single_bug_differs_from_the_correct_loss_on_the_grid() -> None:
    """The grid's B, S, C and temperatures tell every bug factor apart from the correct value."""
    conv = Convention(masked_vocab=True)
    preps = []
    for case in default_cases():
        for dtype in ("float32", "float64"):
            probe = _prepare(Observation(case, dtype, None, dtype, None), "torch")
            exact = predict(_expected(conv, "torch")[0], probe).value
            preps.append(_prepare(Observation(case, dtype, exact, dtype, None), "torch"))
    correct = _expected(conv, "torch")[0]
    assert all(matches(p.obs.value, predict(correct, p)) for p in preps)
    singles = [h for h in hypotheses(conv, "torch") if len(h.bugs()) == 1]
    assert len(singles) == 9 + 4 + 3 + 3  # formulas, reductions, temperature factors, NaN behaviours
    for h in singles:
        assert not all(matches(p.obs.value, predict(h, p)) for p in preps), h.names


@pytest.mark.usefixtures("torch_available")
def test_cross_entropy_is_named_with_a_right_gradient() -> None:
    text = _check(TORCH_FILE, "cross_entropy", "torch").text()
    assert "diagnosis: cross-entropy-not-kl" in text
    assert "gradient: as predicted by this diagnosis in all" in text  # H(teacher) has no student gradient


@pytest.mark.usefixtures("torch_available")
def test_fixed_divisor_names_the_constant() -> None:
    report = _check(TORCH_FILE, "fixed_seq_len", "torch")
    assert _bugs(report) == ["fixed-divisor"], report.text()
    assert "divides the sum over rows by the constant 128 whatever the shape" in report.text()


@pytest.mark.usefixtures("torch_available")
def test_two_bugs_are_named_together() -> None:
    report = _check(TORCH_FILE, "mean_and_t2_forgotten", "torch")
    assert _bugs(report) == ["mean-over-elements", "t2-forgotten"], report.text()
    assert report.diagnosis is not None and report.diagnosis.complete
    assert "diagnosis: mean-over-elements + t2-forgotten" in report.text()


@pytest.mark.usefixtures("torch_available")
def test_generalized_jsd_is_named_with_its_beta() -> None:
    report = _check(TORCH_FILE, "jsd_beta_03", "torch")
    assert _bugs(report) == ["jsd"], report.text()
    assert "generalized JSD with beta 0.3:" in report.text()
    assert "gradient: as predicted by this diagnosis in all" in report.text()
    gkd = _check(TORCH_FILE, "generalized_jsd", "torch")  # TRL's: no T² factor
    assert _bugs(gkd) == ["jsd", "t2-forgotten"], gkd.text()
    assert "generalized JSD with beta 0.5:" in gkd.text()


@pytest.mark.usefixtures("torch_available")
def test_declared_reverse_kl_and_jsd() -> None:
    reverse = Convention.parse(expect="hinton,reverse-kl")
    assert check_loss(_fn(TORCH_FILE, "reverse_kl"), "torch", reverse).ok
    assert check_loss(_fn(TORCH_FILE, "swapped"), "torch", reverse).ok  # the same numbers
    forward = check_loss(_fn(TORCH_FILE, "distilbert"), "torch", reverse)
    assert _bugs(forward) == ["forward-kl"], forward.text()
    assert "expects T² · mean over rows KL(student‖teacher)" in forward.text()

    gkd = Convention.parse(expect="mean,no-t2,jsd:0.5")
    report = check_loss(_fn(TORCH_FILE, "generalized_jsd"), "torch", gkd)
    assert report.ok, report.text()
    assert _bugs(check_loss(_fn(TORCH_FILE, "generalized_jsd"), "torch", Convention.parse(expect="no-t2,jsd:0.7"))
                 ) == ["jsd"]  # fmt: skip
    assert _bugs(check_loss(_fn(TORCH_FILE, "distilbert"), "torch", Convention.parse(expect="no-t2,jsd:0.5"))
                 ) == ["forward-kl", "t2-applied"]  # fmt: skip
    # TRL's beta 0 is the forward KL and beta 1 the reverse KL
    assert Convention.parse(expect="jsd:0").formula == "exact" and Convention.parse(expect="jsd:1").formula == "swapped"


# ------------------------------------------------------------------------------ conventions


@pytest.mark.usefixtures("torch_available")
def test_declared_conventions_are_honoured() -> None:
    import torch.nn.functional as F

    f32 = ("float32",)
    per_token = _fn(TORCH_FILE, "per_token")
    assert check_loss(per_token, "torch", Convention.parse(expect="per-token,t2"), dtypes=f32).ok
    assert _bugs(check_loss(per_token, "torch", dtypes=f32)) == ["unreduced"]

    def batchmean_no_t2(s: Any, t: Any, temp: float) -> Any:  # torch's batchmean: sum / shape[0]
        return F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="batchmean")

    assert check_loss(batchmean_no_t2, "torch", Convention.parse(expect="batch,no-t2"), dtypes=f32).ok
    wrong = check_loss(batchmean_no_t2, "torch", Convention.parse(expect="batch,t2"), dtypes=f32)
    assert _bugs(wrong) == ["t2-forgotten"]

    def from_log_probs(log_p: Any, log_q: Any, temp: float) -> Any:
        rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        return rows.mean() * temp**2

    conv = Convention.parse(inputs="teacher_log_probs,student_log_probs,T", takes="log_probs")
    assert check_loss(from_log_probs, "torch", conv, dtypes=f32).ok

    def fixed_temperature(s: Any, t: Any) -> Any:
        return F.kl_div(F.log_softmax(s / 2.0, -1), F.softmax(t / 2.0, -1), reduction="none").sum(-1).mean() * 4.0

    report = check_loss(fixed_temperature, "torch", Convention.parse(inputs="student,teacher", temperature=2.0),
                        dtypes=f32)
    assert report.ok and {v.obs.case.temperature for v in report.verdicts} == {2.0}


@pytest.mark.usefixtures("torch_available")
def test_pytest_helper_and_fixture(klparity_check_loss: Callable[..., LossReport]) -> None:
    distilbert, swapped = _fn(TORCH_FILE, "distilbert"), _fn(TORCH_FILE, "swapped")
    assert assert_distillation_loss(distilbert).ok  # the framework comes from the file's imports
    with pytest.raises(AssertionError, match="diagnosis: reverse-kl"):
        assert_distillation_loss(swapped)
    assert klparity_check_loss(distilbert, dtypes=("float32",), ndims=(2,)).ok
    with pytest.raises(AssertionError, match="t2-applied-twice"):
        klparity_check_loss(_fn(TORCH_FILE, "t2_twice"), dtypes=("float32",), ndims=(2,))
    report = check_distillation_loss(swapped, framework="torch", dtypes=("float64",), ndims=(3,))
    assert report.bug_names == ["reverse-kl"]  # NaN on masked classes: noted, not judged
    assert report.diagnosis is not None and report.diagnosis.names == ["reverse-kl", "nan-masked-vocab"]


@pytest.fixture(scope="module")
def jax_available() -> None:
    pytest.importorskip("jax")
    pytest.importorskip("optax")


@pytest.mark.usefixtures("jax_available")
@pytest.mark.parametrize("name", ["optax_kl", "log_targets"])
def test_jax_optax_loss_passes(name: str) -> None:
    report = _check(JAX_FILE, name, "jax")
    assert report.ok, report.text()
    assert len(report.verdicts) == 20 and all(v.obs.grad is not None for v in report.verdicts)
    assert any(n.startswith("on logits with masked (-inf) classes: nan-") for n in report.notes)  # 0 · -inf


JAX_BUGS = [
    ("swapped", ["reverse-kl"]),
    ("mean_over_elements", ["mean-over-elements"]),
    ("t2_forgotten", ["t2-forgotten"]),
    ("cross_entropy", ["cross-entropy-not-kl"]),
    ("batch_divisor_3d", ["divides-by-B"]),
    ("stop_gradient", ["no-gradient"]),
]


@pytest.mark.usefixtures("jax_available")
@pytest.mark.parametrize("name,bugs", JAX_BUGS)
def test_jax_bug_is_named(name: str, bugs: list[str]) -> None:
    report = _check(JAX_FILE, name, "jax")
    assert not report.ok
    assert _bugs(report) == bugs, report.text()
    assert report.diagnosis is not None and report.diagnosis.complete, report.text()


# ------------------------------------------------------------------------------- the command


@pytest.mark.usefixtures("torch_available")
def test_cli_exit_status_and_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", f"{TORCH_FILE}:distilbert", "--ndim", "2"]) == 0
    assert "ok: value and gradient" in capsys.readouterr().out
    assert cli.main(["check", f"{TORCH_FILE}:batchmean_3d"]) == 1
    out = capsys.readouterr().out
    assert "diagnosis: divides-by-B" in out and "got/correct = 3" in out  # S = 3 tokens per sequence


@pytest.mark.parametrize(
    "args,message",
    [
        ([f"{LOSSES}/missing.py:f"], "file not found"),
        ([f"{TORCH_FILE}:nope"], "has no function 'nope'; it defines batchmean_3d, cross_entropy"),
        ([f"{TORCH_FILE}:_rows"], "cannot take the 3 declared inputs"),
        ([f"{TORCH_FILE}:no_temperature"], "--temperature 1 --inputs student_logits,teacher_logits"),
        ([f"{TORCH_FILE}:distilbert", "--expect", "batchmeen"], "unknown --expect word 'batchmeen'"),
        ([f"{TORCH_FILE}:distilbert", "--inputs", "student,teacher"], "give the temperature the loss uses"),
        ([f"{TORCH_FILE}:distilbert", "--inputs", "student,logits,T"], "unknown input 'logits'"),
        ([f"{TORCH_FILE}:distilbert", "--dtypes", "float8"], "unknown dtype 'float8'"),
        ([f"{TORCH_FILE}"], "expected FILE.py:FUNCTION"),
        (["klparity.numerics.oracle:kl_from_logits"], "cannot infer the framework"),
    ],
)
def test_cli_usage_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    assert cli.main(["check", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_framework_is_inferred_from_imports(tmp_path: Path) -> None:
    assert imported_frameworks(TORCH_FILE) == {"torch"}
    assert imported_frameworks(KERAS_FILE) == {"tensorflow"}
    both = tmp_path / "both.py"
    both.write_text("import torch\nfrom keras import ops\n")
    with pytest.raises(UsageError, match=r"more than one of \(tensorflow, torch\)"):
        infer_framework(both, None)
    assert infer_framework(both, "torch") == "torch"


def test_a_loss_without_temperature_passes_under_temperature_1(capsys: pytest.CaptureFixture[str]) -> None:
    """The usage error's suggestion works as given (2-argument loss, every shape of the grid)."""
    pytest.importorskip("torch")
    code = cli.main(["check", f"{TORCH_FILE}:no_temperature", "--temperature", "1", "--inputs",
                     "student_logits,teacher_logits"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out


@pytest.mark.parametrize(
    "reduction,divisors",
    [
        ("mean", (4, 6)),  # the rows: B, or B·S
        ("batch", (4, 2)),  # the batch size B = shape[0]
        ("sum", (1, 1)),
        ("elements", (200, 300)),  # every element
        ("per-token", (1, 1)),  # nothing divided
        ("fixed:128", (128, 128)),
    ],
)
def test_reductions_divide_as_the_records_do(reduction: str, divisors: tuple[int, int]) -> None:
    """The checker's reductions are the API records' own (their ``divisor``), on (4, 50) and (2, 3, 50) logits."""
    from klparity.diagnose.records import divisor

    assert (divisor(reduction, (4, 50)), divisor(reduction, (2, 3, 50))) == divisors
