"""The NASA airfoil self-noise data set, found or fetched, and standardised as d2l does.

Where the file comes from, in order: the path given; `../shared/data/airfoil_self_noise.dat`
beside a project checkout; the copy the tests ship (`tests/data/`, so a checkout needs no
network); a copy downloaded earlier into the cache directory; a download from the data set's
public UCI home. Whatever the source, its SHA-1 must be the one d2l's
`get_data_ch11` loads, so every example and test sees the same 1503 rows.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from typing import Optional, Tuple

import numpy as np
import torch

FILE_NAME = "airfoil_self_noise.dat"
SHA1 = "76e5be1548fd8222e5074cf0faae75edff8cf93f"
UCI_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00291/airfoil_self_noise.dat"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_PATH = os.path.join(REPO_ROOT, "..", "shared", "data", FILE_NAME)
TESTS_COPY = os.path.join(REPO_ROOT, "tests", "data", FILE_NAME)
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rmsprop_fused")


def sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def download(dest_dir: str = CACHE_DIR, url: str = UCI_URL) -> str:
    """Fetches the file into dest_dir and returns its path. It is written under a temporary name
    and renamed only once its SHA-1 matches, so a failed or tampered download never poses as the
    data set."""
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, FILE_NAME)
    fd, partial = tempfile.mkstemp(dir=dest_dir, prefix=FILE_NAME + ".")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        got = sha1(partial)
        if got != SHA1:
            raise ValueError(f"{url} has SHA-1 {got}, not the airfoil data set's {SHA1}")
        os.replace(partial, dest)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return dest


def find(path: Optional[str] = None, *, allow_download: bool = True) -> str:
    """The path of a verified copy of the data set (module docstring for the search order)."""
    if path is not None:
        candidates = [path]
    else:
        candidates = [SHARED_PATH, TESTS_COPY, os.path.join(CACHE_DIR, FILE_NAME)]
    for candidate in candidates:
        if os.path.exists(candidate):
            got = sha1(candidate)
            if got != SHA1:
                raise ValueError(f"{candidate} has SHA-1 {got}, not the airfoil data set's {SHA1}")
            return os.path.abspath(candidate)
    if path is not None:
        raise FileNotFoundError(path)
    if not allow_download:
        raise FileNotFoundError(f"no airfoil data at {SHARED_PATH}, {TESTS_COPY} or in {CACHE_DIR}")
    return download()


def load(path: Optional[str] = None, n: Optional[int] = 1500) -> Tuple[torch.Tensor, torch.Tensor]:
    """(X, y) as d2l's `get_data_ch11`: every column, the target too, standardised over all 1503
    rows with the population std (ddof=0) in float32, then the first n rows (n=None: all); X is the
    five features (n, 5), y the scaled sound pressure (n,)."""
    data = np.genfromtxt(find(path), dtype=np.float32, delimiter="\t")
    data = torch.from_numpy((data - data.mean(axis=0)) / data.std(axis=0))
    return data[:n, :-1], data[:n, -1]
