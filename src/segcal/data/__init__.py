"""segcal.data."""
