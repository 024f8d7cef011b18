"""PaddlePaddle adapter: ``paddle.nn.functional.kl_div``, ``log_target`` both ways.

The student goes in as ``F.log_softmax(s / T)``, the target as ``F.softmax(t / T)`` (or
``F.log_softmax(t / T)`` with ``log_target=True``), all computed by Paddle in the tested dtype, as a
distillation user writes it. Paddle's CPU (log_)softmax is not the exact one (see
``klparity.apis.paddle_kl_div``): it clips ``z - max z`` at -64 before ``exp``, and its float32
softmax can turn a NaN logit into a near-zero probability; the spec models both.

``paddle.nn.KLDivLoss`` is not checked separately: its ``forward`` is ``F.kl_div(input, label,
self.reduction, self.log_target)`` through the module attribute, the same code path.

float16 and bfloat16 are not tested: Paddle 3.3 registers no CPU ``kldiv_loss`` kernel for them (a
RuntimeError, pinned as ``paddle.kl_div_half_precision_unsupported_on_cpu``).

``import paddle`` warns (UserWarning "No ccache found ...", from its C++-extension helper, whenever
``ccache`` is not on PATH); the adapter imports Paddle with that warning recorded, not raised, and
keeps it in ``PaddleAdapter.import_warnings``. Paddle logs nothing else on the CPU paths used here.
"""

from __future__ import annotations

import importlib
import math
import warnings
from types import ModuleType
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.base import RUNTIME, Adapter
from klparity.model import Api, ErrorProfile, Output

#: lanes of the vectors paddle.mean's CPU kernel accumulates in (float32, AVX2)
MEAN_LANES: Final = 8

REDUCTIONS: Final = ("none", "sum", "mean", "batchmean", "default")
ENTRY: Final = "paddle.nn.functional.kl_div"


def to_float64(x: Any) -> NDArray[np.float64]:
    """A Paddle tensor's values as a float64 NumPy array on the host (exact for float32 / float64)."""
    return np.asarray(x.numpy(), np.float64)


def dtype_name(x: Any) -> str:
    """``paddle.float32`` -> ``float32``."""
    return str(x.dtype).removeprefix("paddle.")


def loss(paddle: ModuleType, api: Api, red: str, inp: Any, tgt: Any) -> tuple[Any, tuple[str, ...]]:
    """One reduction of ``paddle.nn.functional.kl_div`` (``'default'``: no reduction argument), and the
    warnings it raised. The function is looked up at call time, so a patched one is the one called."""
    kwargs: dict[str, Any] = {"log_target": bool(api.option("log_target", False))}
    if red != "default":
        kwargs["reduction"] = red
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = paddle.nn.functional.kl_div(inp, tgt, **kwargs)
    return res, tuple(str(w.message) for w in caught)


class PaddleAdapter(Adapter):
    """``paddle.nn.functional.kl_div``: every reduction, ``log_target`` both ways, float32 / float64."""

    #: Its own rows of the error model (``klparity.numerics.errormodel``). ``sequential_sums``, measured:
    #: Paddle 3.3's CPU log_softmax (Eigen, float32 and float64) sums exp over the classes one by one
    #: (its log-sum-exp equals a left-to-right loop's to within a rounding: off by 383 u at 32000
    #: float32 classes, 2663 u at 128000, where a pairwise sum is off by < 1 u); its softmax sums in 8
    #: AVX lanes (float32: ceil(C / 8) + 3 roundings) or one by one (float64); paddle.mean accumulates
    #: in 8 lanes, paddle.sum in a tree.
    error_profile: ClassVar[ErrorProfile] = ErrorProfile(sequential_sums=frozenset({"float32", "float64"}))

    name = "paddle"
    module = "paddle"
    distribution = "paddlepaddle"
    extra = "paddle"
    id_prefixes = ("paddle",)
    import_names = ("paddle",)
    short_names = (("paddle.nn.functional.", "paddle.F."),)
    plot_style = "v--"
    dtypes = ("float32", "float64")
    layouts = ("contiguous",)
    _mod: ModuleType | None = None
    #: the warnings ``import paddle`` raised in this process (recorded, not raised)
    import_warnings: ClassVar[tuple[str, ...]] = ()

    def _paddle(self) -> ModuleType:
        """Paddle, imported once with its import-time warnings recorded and the thread cap applied.

        Paddle 3.3 has no public thread setter (no ``paddle.set_num_threads``); ``paddle.base.core.
        set_num_threads`` sets its OpenMP / MKL pools (the BLAS-free kernels used here are single-threaded
        Eigen loops), and ``cap_native_threads``'s OMP_NUM_THREADS / MKL_NUM_THREADS apply before the import.
        """
        if PaddleAdapter._mod is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # through importlib: mypy then needs no stubs where Paddle is not installed
                paddle = importlib.import_module("paddle")
            PaddleAdapter.import_warnings = tuple(f"{w.category.__name__}: {w.message}" for w in caught)
            if RUNTIME.threads is not None:
                setter = getattr(paddle.base.core, "set_num_threads", None)
                if setter is not None:
                    setter(RUNTIME.threads)
            PaddleAdapter._mod = paddle
        return PaddleAdapter._mod

    def reduction_roundings(self, reduction: str, n: int) -> float:
        """``paddle.mean`` ('mean', the default) accumulates in 8 AVX lanes, ceil(n / 8) + 3 roundings
        (measured: over 64000 float32 terms 4.4 times a pairwise sum's bound); ``paddle.sum`` ('sum',
        'batchmean') is a tree, log2 n."""
        if reduction == "mean":
            return math.ceil(n / MEAN_LANES) + math.log2(MEAN_LANES)
        return math.log2(n)

    def devices(self) -> tuple[str, ...]:
        paddle = self._paddle()
        gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        return ("cpu", "gpu") if gpu else ("cpu",)

    def device_names(self) -> dict[str, str]:
        paddle = self._paddle()
        threads = f"{RUNTIME.threads} threads" if RUNTIME.threads is not None else "default threads"
        names = {"cpu": f"cpu ({threads})"}
        if "gpu" in self.devices():
            names["gpu"] = f"gpu:0 {paddle.device.cuda.get_device_name(0)}"
        return names

    def apis(self, dtype: str) -> tuple[Api, ...]:
        return tuple(Api("paddle", ENTRY, "paddle_kl_div", REDUCTIONS, (("log_target", lt),)) for lt in (False, True))

    def compute_dtype(self, api: Api, dtype: str) -> str:
        return dtype

    def _place(self, device: str) -> Any:
        paddle = self._paddle()
        return paddle.CUDAPlace(0) if device == "gpu" else paddle.CPUPlace()

    def inputs(self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float,
               device: str) -> tuple[Any, Any]:  # fmt: skip
        """(input, label) as a user builds them: ``log_softmax(s / T)`` and ``softmax(t / T)`` (or
        ``log_softmax(t / T)`` with ``log_target``), in Paddle, in the arrays' dtype, on ``device``."""
        paddle = self._paddle()
        fn = paddle.nn.functional
        place = self._place(device)
        # a copy of the array in its own dtype: exact (float32 / float64 only, see ``dtypes``)
        t = paddle.to_tensor(np.array(teacher), place=place)
        s = paddle.to_tensor(np.array(student), place=place)
        inp = fn.log_softmax(s / temperature, axis=-1)
        if api.option("log_target", False):
            return inp, fn.log_softmax(t / temperature, axis=-1)
        return inp, fn.softmax(t / temperature, axis=-1)

    def run(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, Output]:
        if layout != "contiguous":
            raise ValueError(f"the paddle adapter runs the contiguous layout only, not {layout!r}")
        if api.entry != ENTRY:
            raise ValueError(f"unknown paddle API {api.entry!r}")
        inp, tgt = self.inputs(api, teacher, student, temperature, device)
        out: dict[str, Output] = {}
        for red in api.reductions:
            res, caught = loss(self._paddle(), api, red, inp, tgt)
            out[red] = Output(value=to_float64(res), dtype=dtype_name(res), warnings=caught)
        return out
