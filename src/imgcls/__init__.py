"""imgcls: multi-class image classification with transfer learning, offline-first."""

__version__ = "0.1.0"
