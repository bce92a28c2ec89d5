"""Model families as pure compute over explicit weight dictionaries.

Each family module exposes the same five functions (see `family.py`), so the engine can run
any of them layer by layer without knowing which one it is.
"""
from .family import Family, get_family

__all__ = ["Family", "get_family"]
