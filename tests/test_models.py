"""Checks for the bundled models against scipy / scikit-learn computed directly."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# tabserve.models imports nothing heavy at module level, so this works without the extra.
from tabserve import models

scipy_stats = pytest.importorskip("scipy.stats")
sk_decomposition = pytest.importorskip("sklearn.decomposition")
sk_preprocessing = pytest.importorskip("sklearn.preprocessing")

A = [5.1, 4.9, 6.2, 5.8, 6.0, 5.5, 5.3]
B = [6.4, 6.9, 5.9, 7.1, 6.6, 7.0, 6.1, 6.8]
C = [5.0, 5.2, 4.8, 5.4]


# --- ttest ------------------------------------------------------------------------


def test_ttest_one_sample_against_population_mean() -> None:
    expected = scipy_stats.ttest_1samp(A, 5.0).pvalue
    assert models.ttest(A, [5.0]) == pytest.approx(expected)
    # A bare number means the same thing.
    assert models.ttest(A, 5) == pytest.approx(expected)


def test_ttest_two_samples_is_welch() -> None:
    expected = scipy_stats.ttest_ind(A, B, equal_var=False).pvalue
    assert models.ttest(A, B) == pytest.approx(expected)
    pooled = scipy_stats.ttest_ind(A, B, equal_var=True).pvalue
    assert not math.isclose(expected, pooled)


def test_ttest_group_labels_split_the_sample() -> None:
    values = A + B
    labels = ["a"] * len(A) + ["b"] * len(B)
    expected = scipy_stats.ttest_ind(A, B, equal_var=False).pvalue
    assert models.ttest(values, labels) == pytest.approx(expected)
    # Interleaved numeric labels work too; order of the groups does not matter.
    mixed_values = [A[0], B[0], A[1], B[1], A[2], B[2], A[3], B[3]]
    mixed_labels = [0, 1, 0, 1, 0, 1, 0, 1]
    expected = scipy_stats.ttest_ind(A[:4], B[:4], equal_var=False).pvalue
    assert models.ttest(mixed_values, mixed_labels) == pytest.approx(expected)


def test_ttest_ignores_missing_values() -> None:
    expected = scipy_stats.ttest_ind(A, B, equal_var=False).pvalue
    assert models.ttest([*A, None], [float("nan"), *B]) == pytest.approx(expected)
    # With labels the whole row goes.
    values = [*A, *B, 100.0]
    labels = ["a"] * len(A) + ["b"] * len(B) + [None]
    assert models.ttest(values, labels) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("arg1", "arg2", "fragment"),
    [
        ([1, "x", 3], [2, 3, 4, 5], "item 1"),
        ([1, 2, 3], [], "empty"),
        ([1], [5.0], "at least two"),
        ("123", [5.0], "must be a list"),
        ([1, 2, 3], [None], "missing"),
        ([1, 2, 3], [True, False, True, True], "only numbers"),
    ],
)
def test_ttest_rejects_bad_input(arg1: object, arg2: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        models.ttest(arg1, arg2)  # type: ignore[arg-type]


# --- anova ------------------------------------------------------------------------


def test_anova_two_and_three_groups() -> None:
    assert models.anova(A, B) == pytest.approx(scipy_stats.f_oneway(A, B).pvalue)
    assert models.anova(A, B, C) == pytest.approx(scipy_stats.f_oneway(A, B, C).pvalue)


def test_anova_ignores_missing_values() -> None:
    expected = scipy_stats.f_oneway(A, B, C).pvalue
    assert models.anova([*A, None], B, [float("nan"), *C]) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("groups", "fragment"),
    [
        (([1, 2], ["a", "b"]), "_arg2 must contain only numbers"),
        (([1, 2], [None]), "_arg2 has no non-missing"),
        (([1], [2]), "two or more values"),
        ((5, [1, 2]), "_arg1 must be a list"),
    ],
)
def test_anova_rejects_bad_input(groups: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        models.anova(*groups)  # type: ignore[arg-type]


# --- PCA --------------------------------------------------------------------------


def _reference_pca(columns: list[np.ndarray]) -> np.ndarray:
    scaled = sk_preprocessing.StandardScaler().fit_transform(np.hstack(columns))
    return sk_decomposition.PCA(n_components=min(scaled.shape)).fit_transform(scaled)


X1 = [2.5, 0.5, 2.2, 1.9, 3.1, 2.3, 2.0, 1.0, 1.5, 1.1]
X2 = [2.4, 0.7, 2.9, 2.2, 3.0, 2.7, 1.6, 1.1, 1.6, 0.9]
X3 = [10.0, 3.0, 12.0, 9.0, 14.0, 11.0, 8.0, 4.0, 6.0, 2.0]


def test_pca_numeric_matches_sklearn() -> None:
    reference = _reference_pca([np.array(c, dtype=float).reshape(-1, 1) for c in (X1, X2, X3)])
    for component in (1, 2, 3):
        got = models.PCA(component, X1, X2, X3)
        assert isinstance(got, list) and all(isinstance(v, float) for v in got)
        np.testing.assert_allclose(got, reference[:, component - 1], atol=1e-9)


def test_pca_first_component_is_the_top_eigenvector_up_to_sign() -> None:
    # An independent check that does not reuse sklearn's PCA.
    data = np.column_stack([X1, X2, X3])
    z = (data - data.mean(axis=0)) / data.std(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(z, rowvar=False))
    top = z @ eigvecs[:, np.argmax(eigvals)]
    got = np.array(models.PCA(1, X1, X2, X3))
    sign = np.sign(got @ top)
    np.testing.assert_allclose(got, sign * top, atol=1e-9)


def test_pca_one_hot_encodes_a_categorical_column() -> None:
    colour = ["red", "blue", "red", "green", "blue", "red", "green", "green", "blue", "red"]
    encoded = sk_preprocessing.OneHotEncoder(sparse_output=False).fit_transform(
        np.array(colour, dtype=object).reshape(-1, 1)
    )
    reference = _reference_pca([np.array(X1).reshape(-1, 1), encoded, np.array(X2).reshape(-1, 1)])
    for component in (1, 2):
        got = models.PCA(component, X1, colour, X2)
        np.testing.assert_allclose(got, reference[:, component - 1], atol=1e-9)


def test_pca_accepts_component_as_a_constant_column() -> None:
    assert models.PCA([2] * len(X1), X1, X2) == pytest.approx(models.PCA(2, X1, X2))
    assert models.PCA(2.0, X1, X2) == pytest.approx(models.PCA(2, X1, X2))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((0, X1, X2), "whole number >= 1"),
        ((1.5, X1, X2), "whole number >= 1"),
        (("1", X1, X2), "whole number >= 1"),
        (([1, 2], X1, X2), "single whole number"),
        ((3, X1, X2), "only 2 exist"),
        ((1, X1, X2[:-1]), "same length"),
        ((1, [*X1[:-1], None], X2), "missing value"),
        ((1, [f"c{i}" for i in range(30)], list(range(30))), "at most 25"),
        ((1, [1.0], [2.0]), "at least two rows"),
        ((1, X1, {"a": 1}), "must be a list"),
    ],
)
def test_pca_rejects_bad_input(args: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        models.PCA(*args)  # type: ignore[arg-type]


# --- packaging --------------------------------------------------------------------


def test_models_registry() -> None:
    assert set(models.MODELS) == {"ttest", "anova", "PCA"}
    for name, (func, description) in models.MODELS.items():
        assert callable(func) and func.__name__ == name
        assert description and func.__doc__


def test_models_unpickle_by_value_without_tabserve(tmp_path: Path) -> None:
    """The server unpickles these by value, so nothing may point back into tabserve."""
    cloudpickle = pytest.importorskip("cloudpickle")
    cloudpickle.register_pickle_by_value(models)
    try:
        for name, (func, _) in models.MODELS.items():
            (tmp_path / f"{name}.pkl").write_bytes(cloudpickle.dumps(func))
    finally:
        cloudpickle.unregister_pickle_by_value(models)

    script = f"""
import pickle, sys
sys.modules["tabserve"] = None  # any import of tabserve now fails
d = {str(tmp_path)!r}
ttest = pickle.load(open(d + "/ttest.pkl", "rb"))
anova = pickle.load(open(d + "/anova.pkl", "rb"))
pca = pickle.load(open(d + "/PCA.pkl", "rb"))
print(ttest({A!r}, [5.0]), anova({A!r}, {B!r}), pca(1, {X1!r}, {X2!r})[0])
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    t, a, p = (float(v) for v in done.stdout.split())
    assert t == pytest.approx(models.ttest(A, [5.0]))
    assert a == pytest.approx(models.anova(A, B))
    assert p == pytest.approx(models.PCA(1, X1, X2)[0])
