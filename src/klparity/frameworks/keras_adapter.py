"""TensorFlow/Keras adapter: ``tf.keras.losses.KLDivergence`` and ``keras.losses.kl_divergence``.

Both arguments are probabilities, ``y_true = softmax(t / T)`` and ``y_pred = softmax(s / T)``,
computed by ``tf.nn.softmax`` in the tested dtype. ``KLDivergence`` converts them to its ``dtype``
(``keras.config.floatx()`` = float32 unless given); the function computes in ``y_pred``'s dtype.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.base import RUNTIME, Adapter
from klparity.model import Api, ErrorProfile, GradOutput, Output, Row

REDUCTIONS = ("none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight", "default")
LOSS_CLASS = "keras.losses.KLDivergence"
LOSS_FUNCTION = "keras.losses.kl_divergence"
DISTILLATION = "keras.distillation.LogitsDistillation"
TF_KERAS = "tf_keras.losses.KLDivergence"


def loss(keras: ModuleType, api: Api, red: str, y_true: Any, y_pred: Any) -> Any:
    """One reduction of the API (``'default'``: the constructor's own); the function has none."""
    if api.entry == LOSS_FUNCTION:
        return keras.losses.kl_divergence(y_true, y_pred)
    if api.entry == TF_KERAS:  # legacy Keras 2, looked up at call time (so a patched one is the one called)
        import tf_keras

        return tf_keras.losses.KLDivergence(**({} if red == "default" else {"reduction": red}))(y_true, y_pred)
    kwargs: dict[str, Any] = dict(api.options)
    if red != "default":
        kwargs["reduction"] = red
    return keras.losses.KLDivergence(**kwargs)(y_true, y_pred)


#: Eigen's tree reduction: leaf size, and the fewest lanes of a packet (float64 under AVX2).
EIGEN_LEAF: Final = 1024
EIGEN_LANES: Final = 4


class KerasAdapter(Adapter):
    """Keras 3 on TensorFlow: the loss class with every reduction and ``dtype=``, and the function."""

    #: Its own rows of the error model (``klparity.numerics.errormodel``). ``flush_to_zero``, measured:
    #: TensorFlow runs with FTZ/DAZ set, so float32 softmax(0, -88) gives exactly 0 and 1e-30 * 1e-10
    #: gives 0 (bfloat16 is computed in float32, float64 shares the SSE mode); its float16 arithmetic is
    #: emulated and keeps subnormals (1e-3 * 1e-3 gives 1.01e-6). There a value below the smallest
    #: normal number N is off by up to N, not by half the smallest subnormal.
    error_profile: ClassVar[ErrorProfile] = ErrorProfile(
        rows={
            "float16": Row(2, 3, "float32", "softmax in float16, then KLDivergence upcasts to floatx() = "
                           "float32 by default: kernel and sum at float32"),
            "bfloat16": Row(2, 3, "float32", "as float16: bfloat16 softmax, float32 kernel"),
        },
        grad_rows={
            "float64": Row(2, 13, "float64", "Keras backward through TF ops: y_true/y_pred, log, reciprocal, "
                           "two products, (-y_true/y_pred)/y_pred (2), product, cast, softmax backward (3), /T"),
            "float32": Row(2, 13, "float32", "as float64, float32 roundoff"),
            "float16": Row(2, 13, "float32", "loss backward in the compute dtype, cast to float16, softmax "
                           "backward in float16 with float32 sums"),
            "bfloat16": Row(2, 13, "float32", "as float16, bfloat16 softmax backward"),
        },
        flush_to_zero=frozenset({"float32", "bfloat16", "float64"}),
    )

    name = "tensorflow"
    module = "tensorflow"
    distribution = "tensorflow-cpu"
    extra = "tensorflow"
    id_prefixes = ("keras", "tensorflow")
    import_names = ("tensorflow", "keras", "tf_keras")
    short_names = (("keras.losses.", "keras."),)
    plot_style = "s--"
    #: Keras's probability-space losses clip to [1e-7, 1]: a user's loss built on them is right with it
    user_losses_clip = "keras.clip_epsilon"
    #: the scale tier: the loss class at its float32 default
    scale_apis = ((Api("tensorflow", LOSS_CLASS, "keras", ("default", "sum")), ("float32",)),)
    #: measured with VmHWM on 2**23 and 2**25 elements: 8.25 (tf.constant copies, softmaxes, Keras's two
    #: clips, the ratio, its log, the product; 6.2 at 2**28); TensorFlow's oneDNN CPU allocator keeps it
    scale_arrays = 9.0
    dtypes = ("float16", "bfloat16", "float32", "float64")
    _mod: ModuleType | None = None

    def version(self) -> str:
        v = super().version()
        if v == "not installed":  # the GPU build has another distribution name
            import importlib.metadata

            try:
                return importlib.metadata.version("tensorflow")
            except importlib.metadata.PackageNotFoundError:
                return v
        return v

    def _tf(self) -> ModuleType:
        if KerasAdapter._mod is None:
            import tensorflow as tf

            # Both must happen before TensorFlow's runtime starts (its first op).
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
            if RUNTIME.threads is not None:
                tf.config.threading.set_intra_op_parallelism_threads(RUNTIME.threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            KerasAdapter._mod = tf
        return KerasAdapter._mod

    def class_sum_roundings(self, n: int) -> float:
        """TensorFlow (Eigen's inner-most reducer) sums leaves of ``EIGEN_LEAF`` elements sequentially over
        packets of at least ``EIGEN_LANES`` lanes, then the leaves pairwise (measured: 140 u on a float64
        sum over 32000 classes)."""
        leaves = max(n / EIGEN_LEAF, 1.0)
        return math.ceil(min(n, EIGEN_LEAF) / EIGEN_LANES) + math.log2(EIGEN_LANES) + math.log2(leaves)

    def devices(self) -> tuple[str, ...]:
        return ("cpu", "gpu") if self._tf().config.list_physical_devices("GPU") else ("cpu",)

    def device_names(self) -> dict[str, str]:
        tf = self._tf()
        names = {"cpu": "cpu"}
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            names["gpu"] = gpus[0].name
        return names

    def version_label(self) -> str:
        """With Keras's version (``tf.keras``) when TensorFlow is installed."""
        v = super().version_label()
        return f"{v} (Keras {self.keras_version()})" if self.available() else v

    def keras_version(self) -> str:
        """Version of Keras as TensorFlow sees it (``tf.keras``)."""
        return str(self._tf().keras.__version__)

    def apis(self, dtype: str) -> tuple[Api, ...]:
        apis = [
            Api(self.name, LOSS_CLASS, "keras", REDUCTIONS),
            Api(self.name, LOSS_FUNCTION, "keras", ("none",)),
        ]
        if dtype == "float64":  # the only way to get a float64 result from the loss class
            apis.append(Api(self.name, LOSS_CLASS, "keras", REDUCTIONS, (("dtype", "float64"),)))
        if self._has_distillation():  # Keras >= 3.12: its own distillation API, default loss and the KL object
            apis += [Api(self.name, DISTILLATION, "keras_distillation", ("default",), (("loss", loss),))
                     for loss in ("kl_divergence", "KLDivergence")]  # fmt: skip
        # legacy Keras 2 (the tf-keras extra): its loss class keeps the input dtype
        apis.append(Api(self.name, TF_KERAS, "tf_keras", ("none", "sum", "sum_over_batch_size", "default"),
                        requires=("tf_keras", "tf-keras")))  # fmt: skip
        return tuple(apis)

    @staticmethod
    @functools.cache
    def _has_distillation() -> bool:
        """keras.distillation exists (Keras 3.12 and later), from the distribution's version: no import
        (read once per process: ``apis`` is asked for every dtype, and by the report for every row)."""
        try:
            major, minor = (int(x) for x in importlib.metadata.version("keras").split(".")[:2])
        except (importlib.metadata.PackageNotFoundError, ValueError):
            return False
        return (major, minor) >= (3, 12)

    def compute_dtype(self, api: Api, dtype: str) -> str:
        if api.entry in (LOSS_FUNCTION, TF_KERAS):
            return dtype
        if api.entry == DISTILLATION and api.option("loss") == "kl_divergence":
            return dtype
        return str(api.option("dtype") or "float32")  # keras.config.floatx() default

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
            raise ValueError("TensorFlow tensors have no user-visible memory layout")
        tf = self._tf()
        import keras  # the same Keras 3 that tf.keras names; it alone exports the function

        dtype = str(teacher.dtype)
        with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
            t = tf.cast(tf.constant(teacher.astype(np.float64)), dtype)
            s = tf.cast(tf.constant(student.astype(np.float64)), dtype)
            if api.entry == DISTILLATION:  # teacher and student logits, T inside
                kd = keras.distillation.LogitsDistillation(temperature=temperature, loss=str(api.option("loss")))
                res = kd.compute_loss(t, s)
                return {"default": Output(np.asarray(res.numpy()).astype(np.float64), res.dtype.name)}
            y_true = tf.nn.softmax(t / temperature, axis=-1)
            y_pred = tf.nn.softmax(s / temperature, axis=-1)
            out: dict[str, Output] = {}
            for red in api.reductions:
                res = loss(keras, api, red, y_true, y_pred)
                out[red] = Output(
                    value=np.asarray(res.numpy()).astype(np.float64),
                    dtype=res.dtype.name,
                )
        return out

    def run_grad(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, GradOutput]:
        """Each reduction's gradients w.r.t. both logits (``tf.GradientTape``; 'none' differentiates the sum)."""
        if layout != "contiguous":
            raise ValueError("TensorFlow tensors have no user-visible memory layout")
        tf = self._tf()
        import keras

        dtype = str(teacher.dtype)
        out: dict[str, GradOutput] = {}
        with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
            t = tf.cast(tf.constant(teacher.astype(np.float64)), dtype)
            s = tf.cast(tf.constant(student.astype(np.float64)), dtype)
            # one persistent tape: the softmax stage is recorded once, each reduction differentiated alone
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([t, s])
                y_true = tf.nn.softmax(t / temperature, axis=-1)
                y_pred = tf.nn.softmax(s / temperature, axis=-1)
                losses = {red: loss(keras, api, red, y_true, y_pred) for red in api.reductions}
            seen_t = np.asarray(y_true.numpy()).astype(np.float64)
            seen_p = np.asarray(y_pred.numpy()).astype(np.float64)
            for red, res in losses.items():
                g_t, g_s = tape.gradient(res, [t, s])
                if g_s is None:
                    raise RuntimeError(f"{api.id} returned no gradient w.r.t. y_pred")
                out[red] = GradOutput(
                    student=np.asarray(g_s.numpy()).astype(np.float64),
                    teacher=None if g_t is None else np.asarray(g_t.numpy()).astype(np.float64),
                    dtype=g_s.dtype.name,
                    seen_target=seen_t,
                    seen_input=seen_p,
                )
        return out

    def run_scale(
        self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float
    ) -> dict[str, Output]:
        """``KerasAdapter.run`` on the CPU for ``api.reductions``, converting the arrays without widening."""
        import keras
        import tensorflow as tf

        if teacher.dtype.name not in ("float16", "float32", "float64"):
            raise ValueError(f"the scale tier runs Keras on float16/32/64 arrays; got {teacher.dtype.name}")
        out: dict[str, Output] = {}
        with tf.device("/CPU:0"):
            y_true = tf.nn.softmax(tf.constant(teacher) / temperature, axis=-1)
            y_pred = tf.nn.softmax(tf.constant(student) / temperature, axis=-1)
            for red in api.reductions:
                res = loss(keras, api, red, y_true, y_pred)
                out[red] = Output(value=np.asarray(res.numpy()).astype(np.float64), dtype=res.dtype.name)
        return out

    def run_user_loss(
        self,
        call: Callable[[Any, Any, Any], Any],
        takes: str,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        key: Hashable = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, str]:
        tf = self._tf()
        dtype = str(teacher.dtype)
        tt = tf.cast(tf.constant(teacher.astype(np.float64)), dtype)
        ss = tf.cast(tf.constant(student.astype(np.float64)), dtype)
        with tf.GradientTape() as tape:
            tape.watch(ss)
            fs, ft = ss, tt
            if takes == "probs":
                fs, ft = tf.nn.softmax(ss / temperature, axis=-1), tf.nn.softmax(tt / temperature, axis=-1)
            elif takes == "log_probs":
                fs, ft = tf.nn.log_softmax(ss / temperature, axis=-1), tf.nn.log_softmax(tt / temperature, axis=-1)
            out = call(fs, ft, temperature)
        if not tf.is_tensor(out):
            raise TypeError(f"the loss returned {type(out).__name__}, not a TensorFlow tensor")
        g = tape.gradient(out, ss)
        grad = None if g is None else np.asarray(g.numpy()).astype(np.float64)
        return np.asarray(out.numpy()).astype(np.float64), grad, out.dtype.name


def tf_module() -> ModuleType:
    """TensorFlow, imported through the adapter (GPU memory growth and thread settings applied before its
    runtime starts): for probes and for the APIs their records call."""
    return KerasAdapter()._tf()
