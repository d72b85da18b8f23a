"""The data layer: datasets for both scenarios, their loaders, generators and downloads.

Collaborative filtering: :class:`InteractionData` (sparse user x item splits) from DiffRec's
``.npy``, LightGCN/KGAT text or GroupLens ``ratings.dat``. Sequential: :class:`SequenceData`
(rows of history and next item) from DreamRec's pickles or DiffuRec's ``dataset.pkl``, each
verified before it is unpickled and converted once to a safe cache. Both have seeded synthetic
generators. Every malformed input raises :class:`DataError` naming the file and the fix.
"""

from refit_gym.data.download import DownloadError, download, fetch_dataset
from refit_gym.data.fileio import (
    DataError,
    atomic_path,
    default_cache_dir,
    default_data_dir,
    sha256_of,
    verify_checksums,
    write_json,
)
from refit_gym.data.interactions import (
    InteractionData,
    carve_validation,
    dense_rows,
    load_diffrec,
    load_lightgcn,
    load_movielens_ratings,
    order_matrix,
    pairs_to_csr,
    rank_within_user,
)
from refit_gym.data.loading import FORMATS, Dataset, dataset_files, load_dataset
from refit_gym.data.sequences import (
    BuiltinsUnpickler,
    SequenceData,
    load_diffurec,
    load_dreamrec,
    prefix_rows,
)
from refit_gym.data.synthetic import make_sequential_synthetic, make_synthetic

__all__ = ["FORMATS", "BuiltinsUnpickler", "DataError", "Dataset", "DownloadError",
           "InteractionData", "SequenceData", "atomic_path", "carve_validation",
           "dataset_files", "default_cache_dir", "default_data_dir", "dense_rows", "download",
           "fetch_dataset", "load_dataset", "load_diffrec", "load_diffurec", "load_dreamrec",
           "load_lightgcn", "load_movielens_ratings", "make_sequential_synthetic",
           "make_synthetic", "order_matrix", "pairs_to_csr", "prefix_rows", "rank_within_user",
           "sha256_of", "verify_checksums", "write_json"]
