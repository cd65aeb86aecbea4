"""segcal.calibrators."""
