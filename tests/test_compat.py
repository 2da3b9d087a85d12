"""The transformers guard: a newer release than the tested range warns once, naming the range; a release that
lacks a hook point fails at import with an error naming the version and what is missing."""

from __future__ import annotations

import warnings

import pytest
import transformers
import transformers.cache_utils

import butler_cache.compat as compat


def test_tested_range_passes_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_transformers_version(compat.TESTED_RANGE[0] + ".0")
        assert compat.check_transformers_version(compat.TESTED_RANGE[1] + ".3")
        assert compat.check_transformers_version(transformers.__version__)


def test_newer_release_warns_with_the_tested_range():
    with pytest.warns(compat.UntestedTransformersWarning) as record:
        assert not compat.check_transformers_version("5.99.0.dev0")
    message = str(record[0].message)
    assert "5.99.0.dev0" in message and f"{compat.TESTED_RANGE[0]} to {compat.TESTED_RANGE[1]}" in message


def test_a_simulated_newer_release_warns_once_per_call_site():
    def import_time_check():
        return compat.check_transformers_version("5.31.0")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: once per call site
        for _ in range(3):
            import_time_check()
    untested = [w for w in record if issubclass(w.category, compat.UntestedTransformersWarning)]
    assert len(untested) == 1 and "5.31.0" in str(untested[0].message)


def test_missing_hook_point_names_the_version_and_what_is_missing(monkeypatch):
    monkeypatch.delattr(transformers.cache_utils, "DynamicLayer")
    with pytest.raises(compat.IncompatibleTransformersError) as error:
        compat.load_hook_points(version="5.40.0")
    message = str(error.value)
    assert "transformers 5.40.0" in message and "transformers.cache_utils.DynamicLayer" in message
    assert "cache layer ButlerLayer extends" in message
    assert isinstance(error.value, ImportError)  # what an import-time failure raises, not a deep AttributeError


def test_the_installed_release_has_every_hook_point():
    assert compat.load_hook_points()["DynamicLayer"] is transformers.cache_utils.DynamicLayer


def test_missing_method_is_named():
    class Layer:
        pass

    with pytest.raises(compat.IncompatibleTransformersError, match=r"transformers 5\.77\.0: .*Layer` has no `crop`"):
        compat.require_method(Layer, "crop", "a cache-layer method", version="5.77.0")
