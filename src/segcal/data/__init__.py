"""segcal.data: datasets (CamVid, generic folders, synthetic), logits store, corruptions."""

from .camvid import CAMVID_CLASSES as CAMVID_CLASSES
from .camvid import CAMVID_PALETTE as CAMVID_PALETTE
from .camvid import CAMVID_SEQUENCES as CAMVID_SEQUENCES
from .camvid import CamVid as CamVid
from .camvid import colorize as colorize
from .camvid import sequence_of as sequence_of
from .folder import SegmentationFolder as SegmentationFolder
from .folder import read_image as read_image
from .folder import read_label as read_label
from .store import LogitsStore as LogitsStore
from .subset import Subset as Subset
from .synthetic import SyntheticSegmentation as SyntheticSegmentation
