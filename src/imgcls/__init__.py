"""imgcls: multi-class image classification with transfer learning, offline-first."""

__version__ = "0.1.0"

__all__ = ["Model", "load", "lr_find", "train", "__version__"]


def __getattr__(name: str):
    # The API pulls in torch: import it on first use, so `import imgcls` (and the CLI's start) stays cheap.
    # `train` is the imgcls.train package, which is callable as the API's train().
    if name == "train":
        import imgcls.train
        return imgcls.train
    if name in ("Model", "load", "lr_find"):
        from imgcls import api
        return getattr(api, name)
    raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
