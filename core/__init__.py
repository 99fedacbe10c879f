"""Minority guidance studio: the core library (no UI). See docs/ARCHITECTURE.md."""
