"""One place for scikit-learn's parameter-validation tools, which live in a private module.

The estimators declare ``_parameter_constraints`` (a dict of parameter name to a list of accepted
constraints) and decorate ``fit`` with ``@_fit_context(prefer_skip_nested_validation=True)``, which checks
every parameter before anything is fitted and raises ``InvalidParameterError`` (a ``ValueError`` and a
``TypeError``) naming it. ``sklearn.utils._param_validation`` is private, so every module imports these
names from here: should scikit-learn move them, this file is the only one to change (imbalanced-learn
keeps the same kind of compatibility layer). It imports only scikit-learn and the standard library, so
every layer of the package may use it.

Two constraints are added: :class:`Interval` also rejects booleans (``hidden_size=True`` is a mistake,
not 1), and :class:`Device` accepts the torch device strings this package supports.
"""

from __future__ import annotations

import re
from numbers import Integral, Real

from sklearn.base import _fit_context
from sklearn.utils._param_validation import (
    HasMethods,
    Hidden,
    InvalidParameterError,
    Options,
    StrOptions,
    validate_params,
)
from sklearn.utils._param_validation import Interval as _SklearnInterval

__all__ = [
    "Device",
    "HasMethods",
    "Hidden",
    "Integral",
    "Interval",
    "InvalidParameterError",
    "Options",
    "Real",
    "StrOptions",
    "_fit_context",
    "validate_params",
]


class Interval(_SklearnInterval):
    """scikit-learn's ``Interval``, except that booleans never satisfy it.

    ``True`` is an ``int`` in Python, so scikit-learn's interval accepts ``hidden_size=True`` as 1. Leave
    the upper end open (``closed="left"`` or ``"neither"`` with ``right=None``) to reject infinity.

    Examples
    --------
    >>> Interval(Integral, 1, None, closed="left").is_satisfied_by(True)
    False
    >>> Interval(Real, 0, None, closed="left").is_satisfied_by(float("inf"))
    False
    """

    def is_satisfied_by(self, val):
        return not isinstance(val, bool) and super().is_satisfied_by(val)


class Device(StrOptions):
    """A torch device string: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"xpu"``...

    Parameters
    ----------
    types : tuple of str, default=("cpu", "cuda", "mps", "xpu")
        Device types accepted besides ``"auto"`` (the faiss estimators search on ``"cpu"`` or ``"cuda"``).

    Examples
    --------
    >>> Device().is_satisfied_by("cuda:1"), Device().is_satisfied_by("gpu0")
    (True, False)
    >>> str(Device(("cpu", "cuda")))
    "a device string: 'auto', 'cpu', 'cuda' or 'cuda:N'"
    """

    _INDEXED = ("cuda", "xpu")

    def __init__(self, types=("cpu", "cuda", "mps", "xpu")):
        super().__init__({"auto", *types})  # a StrOptions, so scikit-learn's checks know how to break it
        self.types = tuple(types)
        alternatives = ["auto"] + [f"{t}(:\\d+)?" if t in self._INDEXED else t for t in self.types]
        self._pattern = re.compile("|".join(alternatives))

    def is_satisfied_by(self, val):
        return isinstance(val, str) and self._pattern.fullmatch(val) is not None

    def __str__(self):
        names = ["'auto'"]
        for t in self.types:
            names += [f"'{t}'", f"'{t}:N'"] if t in self._INDEXED else [f"'{t}'"]
        return f"a device string: {', '.join(names[:-1])} or {names[-1]}"
