"""segcal.models."""
