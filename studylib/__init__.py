"""EnCodec dead-code expiry study."""

# The drop-in fix, importable from the package without making `import studylib` load torch.
_LAZY = {"patch_codebooks": "studylib.quantizers.patch", "unpatch_codebooks": "studylib.quantizers.patch",
         "ExpiryConfig": "studylib.quantizers.ema"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'studylib' has no attribute {name!r}")
