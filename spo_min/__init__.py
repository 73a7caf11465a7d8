"""spo-min: a minimal, readable reference implementation of SPO (Lou et al., AAAI 2025)."""
