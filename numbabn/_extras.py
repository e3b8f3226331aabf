"""Optional dependencies, imported only where they are used.

numbabn itself needs NumPy and Numba only.  The trainer's progress bar (tqdm)
and curves (matplotlib) come with the ``train`` extra; :func:`require` imports
one of them and, when it is missing, raises :class:`MissingExtraError` saying
which ``pip install`` fixes it.
"""

from __future__ import annotations

import importlib

TRAIN_EXTRA_INSTALL = "pip install 'numbabn[train]'"


class MissingExtraError(ImportError):
    """An optional dependency of numbabn is not installed; the message names the fix."""


def require(module: str, purpose: str, extra: str = "train", otherwise: str | None = None):
    """Import and return ``module``, or raise :class:`MissingExtraError`.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"tqdm"`` or ``"matplotlib"``.
    purpose : str
        What needs it, to start the message (e.g. ``"The trainer's progress bar"``).
    extra : str, default "train"
        The numbabn extra that installs it.
    otherwise : str, optional
        Another way out, ending the message (e.g. ``"pass progress=False"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        problem = ("is not installed" if isinstance(e, ModuleNotFoundError)
                   else f"fails to import ({e})")
        raise MissingExtraError(
            f"{purpose} needs {package}, which {problem}. Install numbabn's {extra!r} extra: "
            f"pip install 'numbabn[{extra}]' (in a clone: pip install -e '.[{extra}]')"
            + (f", or {otherwise}." if otherwise else ".")
        ) from e
