"""segcal.data: datasets (CamVid, generic folders, synthetic), dataset specs, logits store, corruptions.

``load_dataset(spec, split)`` gives one split of ``"camvid"``, ``"synthetic"`` or a dataset folder
(``ROOT/<split>/images`` + ``ROOT/<split>/labels``, optional ``classes.txt`` / ``subsets.json``);
``data_root()`` is the one SEGCAL_DATA rule.
"""

from .camvid import CAMVID_CLASSES as CAMVID_CLASSES
from .camvid import CAMVID_PALETTE as CAMVID_PALETTE
from .camvid import CAMVID_SEQUENCES as CAMVID_SEQUENCES
from .camvid import CamVid as CamVid
from .camvid import colorize as colorize
from .camvid import sequence_of as sequence_of
from .corruptions import CorruptedDataset as CorruptedDataset
from .folder import SegmentationFolder as SegmentationFolder
from .folder import read_image as read_image
from .folder import read_label as read_label
from .spec import data_root as data_root
from .spec import dataset_splits as dataset_splits
from .spec import load_dataset as load_dataset
from .store import LogitsStore as LogitsStore
from .subset import Subset as Subset
from .synthetic import SyntheticSegmentation as SyntheticSegmentation
