"""segcal.report."""
