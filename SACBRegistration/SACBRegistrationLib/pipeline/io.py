"""Reading and checking the pipeline's inputs; writing outputs without half-written leftovers.

Images: NIfTI, NRRD, MHA/MHD or a DICOM series folder, read with SimpleITK. Every check raises
:class:`InputError` with a message naming the problem and the fix.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, ResourceError  # noqa: F401  (InputError is importable from here as before)
from ..runtime import keep_signals_for_main_thread
from ..staging import leftovers, make_staging, publish
from ..vocabulary import IMAGE_SUFFIXES  # noqa: F401  (re-exported: image files; DICOM comes as a folder)

ImageLike = Union[str, os.PathLike, sitk.Image]
GEOMETRY_TOLERANCE = 1e-3
"""Relative tolerance (of the spacing) when comparing the geometry of a segmentation and its image."""
SAME_GRID_TOLERANCE = 1e-6
"""Relative tolerance (of the spacing) under which two grids are one: resampling an image onto its own
grid is then a copy (a level grid rebuilt from the network grid differs from the fixed image's by float
rounding only)."""


def _describe(source: ImageLike) -> str:
    return "the given image" if isinstance(source, sitk.Image) else str(source)


def _read_dicom_folder(folder: Path, role: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"no readable DICOM series in the {role} folder {folder}; point to a folder of DICOM "
                         f"slices or to an image file (NIfTI, NRRD, MHA)")
    # the largest series when several share the folder
    files = max((reader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder}: {str(error).splitlines()[0]}") from None


GZIP_CHUNK = 1 << 22
NIFTI1_HEADER_BYTES = 348


def check_file_integrity(path: Path, role: str) -> Optional[bytes]:
    """Refuse truncated or corrupted files that readers would silently zero-fill: a gzip stream
    must reach its end marker with a matching CRC (``.gz``), and a NIfTI file must hold all the
    voxels its header announces, none of them NaN or infinite. Returns a ``.nii.gz`` file's
    decompressed bytes (checked), None for other files."""
    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            if name.endswith(".nii.gz"):
                # one call, not a stream: zlib releases the GIL once per output block instead of once per
                # 32 kB read, so a thread importing torch meanwhile (runtime.import_in_background) no longer
                # stalls it (measured: 4 files of a 1 mm pair 1.1 s -> 0.45 s beside the import)
                data = gzip.decompress(path.read_bytes())
            else:
                data = None
                with gzip.open(path, "rb") as stream:
                    while stream.read(GZIP_CHUNK):
                        pass
        except gzip.BadGzipFile as error:
            if "not a gzipped file" not in str(error).lower():  # a CRC or length mismatch: damaged
                raise InputError(f"the {role} image {path} is truncated or corrupted ({error}); copy or download it "
                                 f"again") from None
            raise InputError(f"cannot read the {role} image {path}: it is not a supported image (NIfTI, NRRD, MHA, or "
                             f"a folder of DICOM slices) or the file is damaged (its name ends in .gz but it is not "
                             f"gzip-compressed)") from None
        except (EOFError, OSError, zlib.error) as error:
            raise InputError(f"the {role} image {path} is truncated or corrupted ({error}); copy or download it "
                             f"again") from None
        if data is not None:
            _check_nifti(data, path, role)
        return data
    if name.endswith(".nii"):
        _check_nifti(path.read_bytes(), path, role)
    return None


def _uncompressed_copy(data: bytes) -> Optional[str]:
    """A temporary ``.nii`` file holding a ``.nii.gz`` file's decompressed bytes, for SimpleITK to read:
    the integrity check has decompressed the file already, and a second decompression in ITK's reader
    cost 0.1-0.15 s of CPU per 1 mm image. None when it cannot be written (a full or read-only
    temporary folder: the caller reads the file itself); the caller removes it."""
    try:
        handle, name = tempfile.mkstemp(prefix="sacb-read-", suffix=".nii")
    except OSError:
        return None
    try:
        with os.fdopen(handle, "wb") as copy:
            copy.write(data)
        return name
    except OSError:
        _remove(name)
        return None


def _remove(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI datatype codes of floating-point voxels (float32, float64)."""


def _check_nifti(data: bytes, path: Path, role: str) -> None:
    """A NIfTI-1 file's bytes (decompressed): all the voxels its header announces must be there, and
    none NaN or infinite (ITK's NIfTI reader turns those into 0 without a word)."""
    if len(data) < NIFTI1_HEADER_BYTES:
        return
    for order in "<>":
        if struct.unpack(order + "i", data[:4])[0] != NIFTI1_HEADER_BYTES:
            continue
        dims = struct.unpack(order + "8h", data[40:56])
        datatype, bitpix = struct.unpack(order + "2h", data[70:74])
        offset = int(struct.unpack(order + "f", data[108:112])[0])
        if not 1 <= dims[0] <= 7 or bitpix <= 0:
            return
        count = int(np.prod([max(1, d) for d in dims[1:dims[0] + 1]], dtype=np.int64))
        expected = offset + count * bitpix // 8
        if len(data) < expected:
            raise InputError(f"the {role} image {path} is truncated: its header announces {expected} bytes of data, "
                             f"the file holds {len(data)}; copy or download it again")
        if datatype in NIFTI_FLOAT_TYPES:
            values = np.frombuffer(data, np.dtype(order + NIFTI_FLOAT_TYPES[datatype]), count, offset)
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                raise InputError(f"the {role} image {path} has {bad} NaN or infinite voxels; replace them (e.g. with "
                                 f"the background value) before registering")
        return


def read_image_file(source: ImageLike, role: str) -> sitk.Image:
    """Read an image (file or DICOM folder) or pass a SimpleITK image through, unchecked."""
    if isinstance(source, sitk.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        hint = (" (wrap an array with SimpleITK: image = sitk.GetImageFromArray(array); image.SetSpacing(...), "
                "SetOrigin(...), SetDirection(...) so that millimetres mean something)"
                if isinstance(source, np.ndarray) else "")
        raise InputError(f"expected a file path, a DICOM folder or a SimpleITK image for the {role} image, got "
                         f"{type(source).__name__}{hint}")
    path = Path(source)
    if not path.exists():
        raise InputError(f"{role} image not found: {path}")
    if path.is_dir():
        return _read_dicom_folder(path, role)
    data = check_file_integrity(path, role)
    copy = _uncompressed_copy(data) if data is not None else None
    del data  # the copy holds the bytes now: not twice in memory while the image is read
    if copy is not None:
        try:
            return sitk.ReadImage(copy)
        except RuntimeError:
            pass  # read the file itself below, which raises the error naming it
        finally:
            _remove(copy)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"cannot read the {role} image {path}: it is not a supported image (NIfTI, NRRD, MHA, "
                         f"or a folder of DICOM slices) or the file is damaged") from None


READER_THREADS = 2
"""Files read at once by :func:`read_image_files` (SimpleITK's readers and zlib release the GIL): the
two images in parallel; the segmentations and the mask are small."""


def read_image_files(sources: Sequence[Tuple[Optional[ImageLike], str]], optional: Sequence[str] = ()) -> List[Optional[sitk.Image]]:
    """:func:`read_image_file` of every ``(source, role)``, several files at once; a None source of a
    role in ``optional`` gives None. Errors come in the order of ``sources`` (the fixed image's
    before the moving one's)."""
    wanted = [(source, role) for source, role in sources if not (source is None and role in optional)]
    if len(wanted) < 2:
        images = iter([read_image_file(source, role) for source, role in wanted])
    else:
        with ThreadPoolExecutor(READER_THREADS, initializer=keep_signals_for_main_thread) as readers:
            pending = [readers.submit(read_image_file, source, role) for source, role in wanted]
            images = iter([future.result() for future in pending])
    return [None if source is None and role in optional else next(images) for source, role in sources]


def _squeeze_to_3d(image: sitk.Image, role: str, source: ImageLike) -> sitk.Image:
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 2:
        raise InputError(f"the {role} image {_describe(source)} is 2D ({size[0]} x {size[1]}); registration needs "
                         f"3D volumes")
    if dim == 4:
        if size[3] != 1:
            raise InputError(f"the {role} image {_describe(source)} is 4D with {size[3]} volumes (a time series?); "
                             f"extract the one volume to register first")
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
    elif dim != 3:
        raise InputError(f"the {role} image {_describe(source)} has {dim} dimensions; expected a 3D volume")
    if min(image.GetSize()) < 2:
        raise InputError(f"the {role} image {_describe(source)} is a single slice (size {image.GetSize()}); "
                         f"registration needs 3D volumes")
    return image


def _check_geometry(image: sitk.Image, role: str, source: ImageLike) -> None:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"the {role} image {_describe(source)} has an invalid spacing {tuple(spacing)}; fix the "
                         f"image header")
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputError(f"the {role} image {_describe(source)} has a degenerate direction matrix; fix the image "
                         f"header")


def _as_pixel_type(image: sitk.Image, pixel: int, source: ImageLike) -> sitk.Image:
    """``image`` with pixel type ``pixel``. A caller's image (``source`` is a SimpleITK image) is always
    copied, so that the pipeline never holds what it was given; an image read here from a file is
    converted only when its type differs (``sitk.Cast`` to the same type copies: 20 MB per 1 mm brain)."""
    if image.GetPixelID() == pixel and not isinstance(source, sitk.Image):
        return image
    return sitk.Cast(image, pixel)


def check_image(image: sitk.Image, role: str, source: ImageLike = None) -> sitk.Image:
    """Validate an intensity image and return it as a 3D float32 SimpleITK image."""
    source = source if source is not None else image
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"the {role} image {_describe(source)} has {image.GetNumberOfComponentsPerPixel()} "
                         f"components per voxel (a vector or RGB image); convert it to a single grey-level "
                         f"volume first")
    image = _squeeze_to_3d(image, role, source)
    _check_geometry(image, role, source)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        raise InputError(f"the {role} image {_describe(source)} has {int((~finite).sum())} NaN or infinite voxels; "
                         f"replace them (e.g. with the background value) before registering")
    low, high = float(array.min()), float(array.max())
    if low == high:
        what = "empty (all zeros)" if low == 0 else f"constant (every voxel is {low:g})"
        raise InputError(f"the {role} image {_describe(source)} is {what}: there is nothing to register; check "
                         f"that the right volume was selected")
    return _as_pixel_type(image, sitk.sitkFloat32, source)


def read_image(source: ImageLike, role: str) -> sitk.Image:
    """Read and validate an intensity image (file, DICOM folder or SimpleITK image)."""
    return check_image(read_image_file(source, role), role, source)


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    spacing = np.array(a.GetSpacing())
    scale = tolerance * float(spacing.min())
    return (np.allclose(a.GetSpacing(), b.GetSpacing(), atol=scale) and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=scale)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def check_segmentation(segmentation: sitk.Image, image: sitk.Image, role: str, source: ImageLike = None) -> sitk.Image:
    """Validate a label image against its intensity image; return it as int32."""
    source = source if source is not None else segmentation
    if segmentation.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"the {role} segmentation {_describe(source)} has several components per voxel; expected "
                         f"a label map (one integer label per voxel)")
    segmentation = _squeeze_to_3d(segmentation, f"{role} segmentation", source)
    if not same_geometry(segmentation, image):
        raise InputError(
            f"the {role} segmentation {_describe(source)} does not match the geometry of its image "
            f"(size {segmentation.GetSize()} vs {image.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in segmentation.GetSpacing())} vs {tuple(round(s, 4) for s in image.GetSpacing())}, "
            f"origin {tuple(round(o, 2) for o in segmentation.GetOrigin())} vs {tuple(round(o, 2) for o in image.GetOrigin())}, "
            f"direction {tuple(round(d, 3) for d in segmentation.GetDirection())} vs "
            f"{tuple(round(d, 3) for d in image.GetDirection())}); "
            f"resample it onto its image's grid (nearest neighbour) or export it with the image as reference")
    array = sitk.GetArrayViewFromImage(segmentation)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"the {role} segmentation {_describe(source)} holds non-integer values (e.g. "
                             f"{float(array[array != np.round(array)].flat[0]) if np.isfinite(array).all() else 'NaN'}); "
                             f"a segmentation must hold integer labels: did you select an intensity image?")
    if array.min() < 0:
        raise InputError(f"the {role} segmentation {_describe(source)} has negative labels; expected labels >= 0 "
                         f"(0 = background)")
    return _as_pixel_type(segmentation, sitk.sitkInt32, source)


def read_segmentation(source: ImageLike, image: sitk.Image, role: str) -> sitk.Image:
    return check_segmentation(read_image_file(source, f"{role} segmentation"), image, role, source)


REPORT_FILE = "report.json"
"""Every saved registration has it: a folder holding it is a previous run's output."""
FULL_DISK_BYTES = 1 << 20
"""A write that fails with less free space than this on the output disk failed because the disk is full."""
FULL_DISK_ERRNOS = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))
"""Operating-system errors of a full disk or an exhausted quota."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def check_output_folder(folder: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """The policy for an existing output folder, checked before any work: a missing or empty folder
    is fine; a previous run's output (it holds ``report.json``) is replaced as a whole only with
    ``overwrite``; a folder holding anything else is refused (its files are never touched)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the output folder {folder} is a file; choose a folder name")
    if folder.is_dir():
        entries = [p for p in folder.iterdir()]
        if entries and not (folder / REPORT_FILE).is_file():
            raise InputError(f"the output folder {folder} already holds other files ({entries[0].name}, ...) and is "
                             f"not a previous registration's output; choose a new or empty folder")
        if entries and not overwrite:
            raise InputError(f"the output folder {folder} holds a previous registration's results; choose another "
                             f"folder, or pass --overwrite (overwrite=True) to replace them as a whole")
    return folder


class StagedOutput:
    """Write a run's outputs into a hidden staging folder beside ``folder``, then publish them with
    one rename: ``folder`` holds either the complete new set or what it held before, never a mix
    or a half-written file.

    An existing ``folder`` follows :func:`check_output_folder` (replaced as a whole with
    ``overwrite``). A lock file beside it (``.<name>.sacb-lock``, holding the writer's pid) stops
    two runs from writing one folder; staging folders left by killed runs are removed by the next
    run. On failure (or cancellation, or SIGTERM turned into an exception by the command line) the
    staging folder and any parent folders created for it are removed; a write that fails because
    the disk is full (or with another operating-system error) is reported as such (see
    :meth:`write_failure`), not as the writer library's own error.
    """

    def __init__(self, folder: Union[str, os.PathLike], overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.overwrite = overwrite
        self.staging: Optional[Path] = None
        self.created: List[Path] = []
        self.lock = self.folder.parent / f".{self.folder.name}.sacb-lock"
        self._locked = False

    def __enter__(self) -> "StagedOutput":
        check_output_folder(self.folder, self.overwrite)
        self.created = _missing_folders(self.folder.parent)
        check_writable(self.folder.parent, keep=True)
        try:
            self._acquire_lock()
            self._remove_stale()
            self.staging = make_staging(self.folder)
        except BaseException:
            self._release_lock()
            _remove_empty(self.created)
            raise
        return self

    def path(self, name: str) -> Path:
        assert self.staging is not None, "use StagedOutput as a context manager"
        return self.staging / name

    def __exit__(self, kind, value, traceback) -> None:
        failure = None
        try:
            if kind is None:
                self._publish()
            elif isinstance(value, Exception):
                failure = self.write_failure(value)  # before the staging folder goes: its disk is still full
        finally:
            if self.staging is not None and self.staging.exists():
                shutil.rmtree(self.staging, ignore_errors=True)
            self._release_lock()
            if kind is not None:
                _remove_empty(self.created)  # a failed run leaves no folder it created
        if failure is not None:
            raise failure from value

    def write_failure(self, error: Exception) -> Optional[Exception]:
        """What to raise instead of ``error``, raised while writing the outputs: a
        :class:`~..errors.ResourceError` when the disk is full (``ENOSPC`` / ``EDQUOT``, or less
        than :data:`FULL_DISK_BYTES` left: SimpleITK's writers raise a bare ``RuntimeError`` then),
        an :class:`InputError` for another operating-system error (an ``OSError`` with an ``errno``),
        ``None`` otherwise (a bug stays visible as itself)."""
        try:
            free: Optional[int] = shutil.disk_usage(self.staging or self.folder.parent).free
        except OSError:
            free = None
        unchanged = f"no output was published ({self.folder} is as it was)"
        if ((isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS)
                or (free is not None and free < FULL_DISK_BYTES)):
            left = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
            return ResourceError(f"the disk is full: no space left while writing the outputs into {self.folder} "
                                 f"({left}); {unchanged}; free some space or choose an output folder on another disk")
        if isinstance(error, OSError) and error.errno is not None:  # one the operating system raised
            return InputError(f"cannot write the outputs into {self.folder} ({error.strerror or error}); "
                              f"{unchanged}; choose another output folder or fix its permissions")
        return None

    def _publish(self) -> None:
        check_output_folder(self.folder, self.overwrite)  # nothing else appeared meanwhile
        publish(self.staging, self.folder)

    def _acquire_lock(self) -> None:
        for _ in range(2):
            try:
                handle = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and _alive(owner):
                    raise InputError(f"another registration (process {owner}) is writing {self.folder}; wait for it "
                                     f"to finish or choose another output folder") from None
                self.lock.unlink(missing_ok=True)  # left by a killed run
                continue
            with os.fdopen(handle, "w") as stream:
                stream.write(str(os.getpid()))
            self._locked = True
            return
        raise InputError(f"cannot lock the output folder {self.folder}; try again")

    def _release_lock(self) -> None:
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False

    def _remove_stale(self) -> None:
        """Staging / replaced folders of runs that were killed (their process is gone)."""
        for leftover, pid in leftovers(self.folder):
            if not _alive(pid):
                shutil.rmtree(leftover, ignore_errors=True)


def check_writable(folder: Union[str, os.PathLike], keep: bool = False) -> Path:
    """Make sure files can be written in ``folder`` (before any work).

    Folders that do not exist yet are created for the check and removed again unless ``keep``,
    so a run that fails later leaves nothing behind.
    """
    folder = Path(folder)
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sacb-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        _remove_empty(created)
        raise InputError(f"the output folder {folder} cannot be written ({error.strerror or error}); choose another "
                         f"folder or fix its permissions") from None
    if not keep:
        _remove_empty(created)
    return folder


def _missing_folders(folder: Path) -> List[Path]:
    """``folder`` and those of its parents that do not exist, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: List[Path]) -> None:
    """Remove ``folders`` (innermost first) where they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
