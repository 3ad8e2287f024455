"""Metrics, pictures, the release gate's rules and the scoring API."""
