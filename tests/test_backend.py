import warnings

import pytest
import torch

from dypo_kernels import backend


def test_without_a_compiler_the_cpu_path_warns_once_and_uses_torch(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    backend.cpu_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backend.select_backend(torch.device("cpu")) == "torch"
            assert backend.select_backend(torch.device("cpu")) == "torch"
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "no C++ compiler" in messages[0]
    finally:
        backend.cpu_extension.cache_clear()


def test_unknown_forced_backend_is_named(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match=backend.BACKEND_ENV):
        backend.select_backend(torch.device("cpu"))
