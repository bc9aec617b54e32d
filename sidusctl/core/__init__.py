"""Core leaves: errors, process runner, logging, paths and atomic persistence.

Nothing here imports any other part of sidusctl.
"""
