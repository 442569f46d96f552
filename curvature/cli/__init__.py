"""The ``curvature`` command: a sharpness report of a model from the shell.

``curvature report`` with no arguments is a complete, self-contained run: it trains a 64-32-10 tanh MLP
(2410 parameters) on scikit-learn's digits (8x8 images, 10 classes, shipped with scikit-learn: no
download), 75/25 stratified split, standardized with the training statistics, 30 epochs of minibatch SGD
(lr 0.05, momentum 0.9, batch 64), then measures the Hessian of the mean cross-entropy over the whole
training split (one full batch of 1347 samples) with :func:`curvature.sharpness`, prints the report and
writes ``report.json`` and ``density.png`` into ``--out`` (default ``./curvature-report``). It takes about 5
seconds on a 2-core CPU, start-up included. With ``--dtype float64 --seed 0`` the model is the one of
``examples/sharpness.py``.

Your own model and data come from Python files (or importable modules), each naming a factory that is
called with no arguments:

- ``--model FILE.py:FACTORY`` returns a ``torch.nn.Module``. The model is measured as it is (after
  ``--checkpoint``), in eval mode, never trained. It needs ``--data``.
- ``--data FILE.py:FACTORY`` returns the data: one ``(inputs, targets)`` batch, a re-iterable of such
  batches (a ``DataLoader``, a list), or a dict ``{"data": ..., "loss_fn": ...}`` to bring a loss
  (``loss_fn(outputs, targets)`` returning a scalar; ``--loss`` overrides it; default cross-entropy).
  Inputs may be a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``). Floating
  tensors are converted to ``--dtype`` and every tensor is moved to ``--device``.
- ``--checkpoint PATH`` is a file written by ``torch.save``, read with ``weights_only=True``: a state
  dict, or a dict holding one under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``. It must fit the
  model exactly (``load_state_dict(strict=True)``). With the built-in model it replaces the training.

The factories run after ``torch.manual_seed(--seed)``, so a randomly initialized model is reproducible;
the same seed drives the training's shuffling and every random draw of the estimators.

Every user error (a wrong path, a missing or failing factory, a factory that returns the wrong thing, a
checkpoint that does not fit or holds NaN or Inf, a loss that does not reduce the batch to a scalar, an
``--out`` that cannot be created or written, an unknown metric, dtype or device, data that does not fit the
model) exits with status 2 and one line on stderr, ``curvature: error: ...``, without a traceback. Progress bars
(training, products) go to stderr when it is a terminal; ``--quiet`` prints nothing but the report.

Example:
    Run from Python (the shell's ``curvature ...`` is ``main([...])``):

    >>> main(["--version"])  # doctest: +ELLIPSIS
    curvature ...
    0
"""

# main and DEFAULT_METRICS are the public names; the others the one-module command had stay importable from here.
from .command import main
from .device import resolve_device  # noqa: F401
from .digits import BUILTIN_DATA, BUILTIN_MODEL, DEFAULT_EPOCHS, _builtin_model  # noqa: F401
from .errors import UsageError  # noqa: F401
from .loading import CHECKPOINT_KEYS, DATA_KEYS, load_checkpoint, load_data, load_model  # noqa: F401
from .parser import CONTRACTS, DEFAULT_METRICS, DTYPES, LOSSES, build_parser  # noqa: F401

__all__ = ["DEFAULT_METRICS", "main"]
