"""Lean on-robot runtime: bundle loading, preprocessing, stage engines, decode program, loop. No torch."""
