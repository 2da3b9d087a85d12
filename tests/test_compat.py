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


def test_a_checkout_root_on_sys_path_is_named_as_the_cause(tmp_path):
    """Python started in the checkout's root imports its kernels/ folder as the top-level `kernels` module; where
    transformers imports the PyPI package of that name (5.25 does), butler_cache's import error says so."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(compat.__file__).resolve().parents[2]
    script = "import sys, kernels; import butler_cache.compat as c; print(c.shadowing_kernels_folder())"
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    spec = importlib.util.find_spec("kernels")  # the PyPI package, where installed (not on this process's path)
    if out.returncode == 0:  # this transformers does not import `kernels`: the import works, the folder is named
        assert out.stdout.strip() == str(root / "kernels")
    else:
        assert spec is not None, out.stderr[-2000:]
        assert "shadows the PyPI package `kernels`" in out.stderr and str(root / "kernels") in out.stderr
    neutral = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if spec is not None:  # from elsewhere: no shadow
        assert neutral.returncode == 0 and neutral.stdout.strip() == "None", neutral.stderr[-2000:]
