"""fedpriv/runtime/warm_imports.py: what the SuperExec imports and builds once, safely for its forks."""

from __future__ import annotations

from fedpriv.runtime import fork_safety, warm_imports


def test_preloading_imports_torch_without_initialising_cuda_or_threads():
    loaded = warm_imports.preload()
    assert "torch" in loaded and "opacus" in loaded
    import torch

    assert not torch.cuda.is_initialized()
    assert fork_safety.fork_is_safe() is None


def test_warm_caches_hand_children_transformers_conversion_mapping_built(monkeypatch):
    from transformers import conversion_mapping

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    assert warm_imports.warm_caches() == ["transformers.conversion_mapping", "presidio.recognizers"]
    assert conversion_mapping._checkpoint_conversion_mapping_cache  # what PEFT's model wrapping reads
    assert fork_safety.fork_is_safe() is None and fork_safety.extra_threads() is None


def test_a_failing_redaction_warm_up_leaves_the_superexec_running(monkeypatch, capsys):
    from fedpriv.privacy import redaction

    def broken():
        raise RuntimeError("recognizer registry broke")

    monkeypatch.setattr(redaction, "warm_engine", broken)
    assert "presidio.recognizers" not in warm_imports.warm_caches()
    assert "redaction not warmed (RuntimeError: recognizer registry broke)" in capsys.readouterr().err
