"""segcal.detectors."""
