"""segcal.losses."""
