"""segcal.data."""
from .store import LogitsStore as LogitsStore
