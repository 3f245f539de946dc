"""Test helpers shared by tests/test_*.py: gloo process spawning, tiny data, run configs and subprocess
runs, fault injection, checkpoints. Import as `from helpers.runs import tiny_config` (pytest puts tests/ on
sys.path, tests/conftest.py holds the fixtures)."""
