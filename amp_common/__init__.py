"""Small pieces every part of the app shares: exit codes, atomic file writes, dtype names."""
