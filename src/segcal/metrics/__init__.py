"""segcal.metrics."""
