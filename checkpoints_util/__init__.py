"""Sharded checkpoints: save, resume (also on another world size), consolidate, export, inspect."""
