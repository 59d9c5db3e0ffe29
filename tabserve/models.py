"""Statistical models that `tabserve deploy-models` publishes as endpoints.

They are call-compatible with the three models TabPy ships (`ttest`, `anova`, `PCA`), so
calculated fields such as `tabpy.query('ttest', _arg1, _arg2)['response']` keep working.

Every function is deliberately self-contained: its imports and helpers live inside its
own body, so it also works when cloudpickled *by value* (copied into a notebook and deployed
from there), where nothing at module level here travels with it. `tabserve deploy-models`
pickles them by reference instead. scipy and scikit-learn are only needed on the server
that runs them (the optional `models` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def ttest(_arg1: Sequence[float], _arg2: Sequence[Any] | float) -> float:
    """Two-sided t-test; returns the p-value.

    How the second argument is read:
    - a single number (or a one-element list): the population mean, so a one-sample
      t-test of `_arg1` against it;
    - a list as long as `_arg1` holding exactly two distinct values: a group label per
      row, so `_arg1` is split into two samples and compared with Welch's t-test;
    - any other list of numbers: a second sample, compared with Welch's t-test
      (unequal variances).

    Missing values (null/NaN) are ignored; with group labels the whole row is dropped.

    Example: tabpy.query('ttest', _arg1, _arg2)['response']
    """
    import math
    from numbers import Real

    from scipy import stats

    def is_missing(value: Any) -> bool:
        return value is None or (isinstance(value, float) and math.isnan(value))

    def as_list(name: str, values: Any) -> list[Any]:
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise ValueError(
                f"ttest: {name} must be a list of numbers, got {type(values).__name__}"
            )
        return list(values)

    def numbers(name: str, values: list[Any]) -> list[float]:
        out: list[float] = []
        for i, value in enumerate(values):
            if is_missing(value):
                continue
            # bool is a Real subclass, but a True/False column is almost surely a mistake here
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"ttest: {name} must contain only numbers; item {i} is {value!r}")
            out.append(float(value))
        return out

    sample = as_list("_arg1", _arg1)
    if isinstance(_arg2, Real) and not isinstance(_arg2, bool):
        other: list[Any] = [_arg2]
    else:
        other = as_list("_arg2", _arg2)
    if not other:
        raise ValueError("ttest: _arg2 is empty; pass a population mean, labels or a sample")

    if len(other) == 1:
        mean = numbers("_arg2 (population mean)", other)
        if not mean:
            raise ValueError("ttest: the population mean in _arg2 is missing")
        values = numbers("_arg1", sample)
        if len(values) < 2:
            raise ValueError("ttest: _arg1 needs at least two non-missing numbers")
        return float(stats.ttest_1samp(values, mean[0]).pvalue)

    try:
        labels = {label for label in other if not is_missing(label)}
    except TypeError as exc:  # unhashable items such as nested lists
        raise ValueError("ttest: _arg2 must be a flat list of numbers or labels") from exc
    if len(other) == len(sample) and len(labels) == 2:
        groups: dict[Any, list[Any]] = {label: [] for label in labels}
        for value, label in zip(sample, other, strict=True):
            if not is_missing(value) and not is_missing(label):
                groups[label].append(value)
        first, second = (numbers(f"_arg1 (group {label!r})", groups[label]) for label in labels)
    else:
        first, second = numbers("_arg1", sample), numbers("_arg2", other)
    if len(first) < 2 or len(second) < 2:
        raise ValueError("ttest: each sample needs at least two non-missing numbers")
    return float(stats.ttest_ind(first, second, equal_var=False).pvalue)


def anova(_arg1: Sequence[float], _arg2: Sequence[float], *_argN: Sequence[float]) -> float:
    """One-way ANOVA across two or more groups; returns the p-value.

    Each argument is one group: a list of numbers (the lists may differ in length).
    A small p-value means at least one group mean differs from the others.
    Missing values (null/NaN) are ignored.

    Example: tabpy.query('anova', _arg1, _arg2, _arg3)['response']
    """
    import math
    from numbers import Real

    from scipy import stats

    groups: list[list[float]] = []
    for position, values in enumerate((_arg1, _arg2, *_argN), start=1):
        name = f"_arg{position}"
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise ValueError(
                f"anova: {name} must be a list of numbers, got {type(values).__name__}"
            )
        group: list[float] = []
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"anova: {name} must contain only numbers; item {i} is {value!r}")
            group.append(float(value))
        if not group:
            raise ValueError(f"anova: {name} has no non-missing numbers")
        groups.append(group)

    # With one value per group there are no within-group degrees of freedom.
    if sum(len(g) for g in groups) <= len(groups):
        raise ValueError("anova: at least one group needs two or more values")
    return float(stats.f_oneway(*groups).pvalue)


# Upper-case name on purpose: it is the endpoint name TabPy users already call.
def PCA(
    component: int | Sequence[int],
    _arg1: Sequence[Any],
    _arg2: Sequence[Any],
    *_argN: Sequence[Any],
) -> list[float]:
    """Principal component analysis; returns one principal component per row.

    `component` picks which component to return, counting from 1 (1 = the direction of
    greatest variance). The remaining arguments are the columns, all of the same length.
    Numeric columns are used as they are; text columns are treated as categories and
    one-hot encoded (at most 25 distinct values per column). Every column is then
    standardised (mean 0, variance 1) before the PCA, so units do not matter.
    Missing values are not allowed: filter out nulls first.

    Example: tabpy.query('PCA', 1, _arg1, _arg2, _arg3)['response']
    """
    import math
    from numbers import Real

    import numpy as np
    from sklearn.decomposition import PCA as SkPCA
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    max_categories = 25

    # Tableau may pass the component as a column of identical values rather than a scalar.
    picked: Any = component
    if not isinstance(picked, (str, bytes)) and hasattr(picked, "__iter__"):
        distinct = set(picked)
        if len(distinct) != 1:
            raise ValueError("PCA: component must be a single whole number such as 1")
        (picked,) = distinct
    if (
        isinstance(picked, bool)
        or not isinstance(picked, Real)
        or not float(picked).is_integer()
        or picked < 1
    ):
        raise ValueError(f"PCA: component must be a whole number >= 1, got {picked!r}")
    index = int(picked) - 1

    columns = [_arg1, _arg2, *_argN]
    lengths = set()
    for position, column in enumerate(columns, start=1):
        if isinstance(column, (str, bytes, dict)) or not hasattr(column, "__len__"):
            raise ValueError(f"PCA: _arg{position} must be a list, got {type(column).__name__}")
        lengths.add(len(column))
    if len(lengths) != 1:
        raise ValueError(f"PCA: all columns must have the same length, got {sorted(lengths)}")
    (n_rows,) = lengths
    if n_rows < 2:
        raise ValueError("PCA: at least two rows are needed")

    blocks: list[Any] = []
    for position, column in enumerate(columns, start=1):
        name = f"_arg{position}"
        for i, value in enumerate(column):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"PCA: {name} has a missing value at item {i}; filter nulls")
        if any(isinstance(value, str) for value in column):
            # Mixed text and numbers is read as text: the numbers are labels too.
            labels = np.array([str(value) for value in column], dtype=object).reshape(-1, 1)
            n_distinct = len(set(labels[:, 0]))
            if n_distinct > max_categories:
                raise ValueError(
                    f"PCA: {name} looks categorical but has {n_distinct} distinct values; "
                    f"at most {max_categories} are supported"
                )
            # sparse_output replaced sparse in scikit-learn 1.2; the old name is gone in 1.4.
            encoder = OneHotEncoder(sparse_output=False)
            blocks.append(encoder.fit_transform(labels))
        else:
            for i, value in enumerate(column):
                if not isinstance(value, Real):
                    raise ValueError(f"PCA: {name} item {i} is not a number: {value!r}")
            blocks.append(np.asarray(column, dtype=float).reshape(-1, 1))

    features = np.hstack(blocks)
    n_components = min(features.shape)
    if index >= n_components:
        raise ValueError(
            f"PCA: component {index + 1} requested but only {n_components} exist "
            f"for {features.shape[0]} rows and {features.shape[1]} encoded columns"
        )
    scaled = StandardScaler().fit_transform(features)
    scores = SkPCA(n_components=n_components).fit_transform(scaled)
    return [float(v) for v in scores[:, index]]


MODELS: dict[str, tuple[Callable[..., Any], str]] = {
    "ttest": (
        ttest,
        "Returns the p-value of a t-test: one-sample against a population mean, "
        "or Welch's two-sample test (second sample or two-level group labels).",
    ),
    "anova": (
        anova,
        "Returns the p-value of a one-way ANOVA across two or more groups of numbers.",
    ),
    "PCA": (
        PCA,
        "Returns the chosen principal component (1-based) of standardised columns; "
        "text columns are one-hot encoded.",
    ),
}
