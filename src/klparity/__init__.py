"""klparity: does KL divergence mean the same in PyTorch, TensorFlow/Keras and the exact math?

The public entry points are the oracle (``klparity.numerics.oracle.kl_from_logits`` and friends, also
re-exported here), the pytest plugin (``pytest --pyargs klparity``) and the ``klparity`` command.
"""

from klparity.numerics.oracle import kl_from_log_probs, kl_from_logits, kl_from_probs

__version__ = "0.1.0"
__all__ = ["__version__", "kl_from_log_probs", "kl_from_logits", "kl_from_probs"]
