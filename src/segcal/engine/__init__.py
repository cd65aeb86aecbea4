"""segcal.engine."""
