"""Fast path of AdamMini: compiled per-unit kernels (placeholder until the compiled path lands).

Every function returns None / False when it did not do the work, and the caller then runs eager.
"""
from __future__ import annotations


def compile_available() -> bool:
    return False


def block_sumsq(plan, g):
    return None


def apply_units(opt, group, todo, states, grads, sumsqs, steps) -> bool:
    return False
