"""torchvision's datasets from ``--data-root``: CIFAR-10/100 (read with a restricted unpickler, no md5 check
of re-exported copies), MNIST, Fashion-MNIST and SVHN (torchvision's own readers); never downloaded
without ``--download``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ftdoctor.data.arrays import ArraySplit, capped
from ftdoctor.data.sources import DataSource, register_data_source

if TYPE_CHECKING:
    from ftdoctor.data.bundle import DataOptions

from ftdoctor.errors import FtdoctorError

TORCHVISION_NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "svhn")
SPLITS = ("train", "test")


def default_data_root() -> str:
    """``$FTDOCTOR_DATA`` or ``~/.cache/ftdoctor/data``."""
    return os.environ.get("FTDOCTOR_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "ftdoctor", "data")


# torchvision class, folder it reads (relative to the root), class count
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
    "mnist": ("MNIST", os.path.join("MNIST", "raw"), 10),
    "fashion-mnist": ("FashionMNIST", os.path.join("FashionMNIST", "raw"), 10),
    "svhn": ("SVHN", "{split}_32x32.mat", 10),
}


def _str_keys(entry: object) -> object:
    """Python 3 re-exports of the CIFAR pickles have bytes keys and values where the originals have str."""
    if isinstance(entry, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    return entry


def _cifar_entry(path: str, keys: tuple[str, ...]) -> dict:
    """One CIFAR batch or meta pickle, read by :class:`~ftdoctor.safety.DataUnpickler` (no code runs)."""
    from ftdoctor.safety import load_data_pickle

    entry = _str_keys(load_data_pickle(path, remedy="re-fetch the dataset with --download, or point --data-root "
                                                    "at a good copy"))
    if not isinstance(entry, dict) or not any(k in entry for k in keys):
        raise FtdoctorError(f"{path} is not a CIFAR file: it lacks {' or '.join(map(repr, keys))}",
                            "re-fetch the dataset with --download, or point --data-root at a good copy")
    return entry


def _cifar_class(base: type) -> type:
    """torchvision's CIFAR class, reading its files without pickle's code execution or the md5 check.

    torchvision reads CIFAR's batch and meta files with ``pickle.load``, which
    runs any code a file asks for, and checks every file's md5 even when it
    will not download — a guard for downloads that also rejects re-exported or
    trimmed copies. This subclass lets torchvision download (``--download``,
    md5-checked as before) but reads the files itself, with torchvision's
    layout and a restricted unpickler (:func:`ftdoctor.safety.load_data_pickle`).
    """
    from torchvision.datasets.vision import VisionDataset

    class Cifar(base):  # type: ignore[misc, valid-type]
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            VisionDataset.__init__(self, root)
            self.train = train
            if download:
                self.download()
            if not self._present():
                raise RuntimeError("Dataset not found or corrupted.")
            data, targets = [], []
            for file_name, _ in (self.train_list if train else self.test_list):
                entry = _cifar_entry(os.path.join(self.root, self.base_folder, file_name),
                                     ("labels", "fine_labels"))
                data.append(_cifar_images(entry.get("data"), file_name))
                labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
                targets.extend(int(v) for v in np.asarray(labels, dtype=np.int64).reshape(-1))
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            if len(targets) != len(self.data):
                raise FtdoctorError(f"{self.base_folder} has {len(self.data)} images but {len(targets)} labels",
                                    "re-fetch the dataset with --download")
            self.targets = targets
            meta = _cifar_entry(os.path.join(self.root, self.base_folder, self.meta["filename"]),
                                (self.meta["key"],))
            self.classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta[self.meta["key"]]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        def _present(self) -> bool:
            from ftdoctor.safety import is_regular

            names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(is_regular(os.path.join(self.root, self.base_folder, f)) for f in names)

    Cifar.__name__ = Cifar.__qualname__ = base.__name__
    return Cifar


def _cifar_images(data: object, name: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise FtdoctorError(f"the CIFAR file {name} holds {type(data).__name__} {shape} as 'data', not "
                            "N×3072 uint8 images", "re-fetch the dataset with --download")
    return data


def torchvision_split(name: str, opts: DataOptions) -> ArraySplit:
    import torchvision.datasets as tvd

    class_name, where, num_classes = _TORCHVISION[name]
    root = os.path.abspath(os.path.expanduser(opts.data_root or default_data_root()))
    looked_in = os.path.join(root, where.format(split=opts.split))
    cls = getattr(tvd, class_name)
    if name in ("cifar10", "cifar100"):
        cls = _cifar_class(cls)
    try:
        if name == "svhn":
            ds = cls(root, split=opts.split, download=opts.download)
        else:
            ds = cls(root, train=opts.split == "train", download=opts.download)
    except FtdoctorError:
        raise
    except ImportError as exc:
        missing = exc.name or "a package"
        raise FtdoctorError(f"reading {name} needs the Python package {missing}",
                            f"pip install {missing}") from exc
    except Exception as exc:  # torchvision raises RuntimeError, but a bad file can raise anything
        if opts.download:
            raise FtdoctorError(f"could not download {name} into {root}: {exc}",
                                "check the network connection, or copy the files into "
                                f"{looked_in} and run without --download") from exc
        if not os.path.exists(looked_in):
            raise FtdoctorError(f"{name} not found: looked in {looked_in}",
                                "pass --download to fetch it, or --data-root DIR for a "
                                "directory that holds it") from exc
        raise FtdoctorError(f"{name} files in {looked_in} are incomplete or corrupted: {exc}",
                            "re-fetch them with --download, or point --data-root at a "
                            "good copy") from exc

    if name == "svhn":
        images, layout, labels = ds.data, "NCHW", np.asarray(ds.labels)
    elif name in ("mnist", "fashion-mnist"):
        images, layout, labels = ds.data.numpy(), "NHW", ds.targets.numpy()
    else:
        images, layout, labels = np.asarray(ds.data), "NHWC", np.asarray(ds.targets)
        num_classes = len(getattr(ds, "classes", ())) or num_classes
    cap = capped(len(labels), opts.max_samples)
    # copies, so the rest of the split is freed
    return ArraySplit(np.array(images[:cap]), layout, np.array(labels[:cap]), num_classes)


@register_data_source(name="torchvision", priority=30, names=TORCHVISION_NAMES)
class TorchvisionData(DataSource):
    def claims(self, data: str) -> bool:
        return data.lower().replace("_", "-") in TORCHVISION_NAMES

    def open(self, data: str, opts: Any) -> tuple[Any, str]:
        key = data.lower().replace("_", "-")
        return torchvision_split(key, opts), key

    def inputs(self, data: str, data_root: str | None) -> list[Path]:
        root = os.path.abspath(os.path.expanduser(data_root or default_data_root()))
        where = _TORCHVISION[data.lower().replace("_", "-")][1]
        return [Path(root) / where.format(split=s) for s in SPLITS] if "{" in where else [Path(root) / where]
