"""Shared test set-up. The Triton interpreter must be switched on before any kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
