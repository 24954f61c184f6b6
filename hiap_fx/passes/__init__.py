"""Compiler passes: capture, normalise, propagate, discover (gate, cost, slice, verify follow)."""
