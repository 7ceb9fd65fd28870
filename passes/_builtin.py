"""Imports every in-tree pass module so each registers itself."""

from __future__ import annotations
