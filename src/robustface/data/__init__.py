"""Dataset formats (RecordIO, folders, verification .bin, IJB, learn-to-cluster), transforms."""

from robustface.data.folder import ImageFolderDataset, folder_to_rec
from robustface.data.ijb import IJBMeta, read_ijb_meta, write_ijb_meta
from robustface.data.image import decode_image, encode_image
from robustface.data.ltc import (
    read_features,
    read_knn,
    read_meta,
    write_features,
    write_knn,
    write_meta,
)
from robustface.data.recordio import (
    IndexedRecordReader,
    IRHeader,
    RecordIODataset,
    RecordIOWriter,
    pack_record,
    unpack_record,
    write_flat_rec,
    write_insightface_rec,
)
from robustface.data.transforms import (
    EvalTransform,
    TrainTransform,
    normalize_images,
    to_tensor_normalized,
)
from robustface.data.verification import load_bin, load_bin_images, write_bin

__all__ = [
    "EvalTransform",
    "IJBMeta",
    "IRHeader",
    "ImageFolderDataset",
    "IndexedRecordReader",
    "RecordIODataset",
    "RecordIOWriter",
    "TrainTransform",
    "decode_image",
    "encode_image",
    "folder_to_rec",
    "load_bin",
    "load_bin_images",
    "normalize_images",
    "pack_record",
    "read_features",
    "read_ijb_meta",
    "read_knn",
    "read_meta",
    "to_tensor_normalized",
    "unpack_record",
    "write_bin",
    "write_features",
    "write_flat_rec",
    "write_ijb_meta",
    "write_insightface_rec",
    "write_knn",
    "write_meta",
]
