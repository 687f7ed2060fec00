"""Measuring models: calibration, accuracy tables, cascade curves (numpy only)."""
