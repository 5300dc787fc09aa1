"""alignloop: align a language model with human feedback, end to end (see docs/architecture.md)."""
__version__ = "0.1.0"
