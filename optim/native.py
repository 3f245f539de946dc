"""The native CPU kernel of AdamMini: `csrc/adam_mini_rows.cpp`, built with the system C++ compiler on first use.

Units of complete blocks (every unsharded parameter) on CPU take their whole update, block sums of g²
and v included, from one call per step into this kernel (see the .cpp for the math and why it moves 20
bytes per parameter with an fp32 first moment, 16 with a bf16 one, against fused AdamW's 28). It is
plain C ABI code loaded with ctypes: no torch headers, so a build takes about half a second, and the
library is cached on disk, keyed by the source, the compiler, the flags and the CPU (it is built with
`-march=native`, so a cache shared between nodes of different CPUs keeps one build per CPU kind).
OpenMP, when the compiler has it, binds to the runtime torch already loaded (`libgomp.so.1`), so the
kernel runs on torch's thread count.

Environment:
  ADAM_MINI_CXX        the compiler (default: $CXX, else c++ / g++ / clang++ from PATH)
  ADAM_MINI_CACHE_DIR  where built libraries are kept (default: $XDG_CACHE_HOME or ~/.cache, then
                       adam-mini-pretrain/; a temporary folder when that is not writable)

If no compiler is found or the build fails, `load()` warns once and returns None; AdamMini's `auto`
implementation then uses its compiled (torch.compile) or eager path, with the same math.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from optim.blocks import Chunk
from optim.update import StepHyper

SOURCE = Path(__file__).with_name("csrc") / "adam_mini_rows.cpp"
ABI = 2
# Flag sets tried in order: the first that builds is used. OpenMP and -march=native are optional.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
# -ffp-contract=off: no FMA contraction, so m is computed with the same roundings as the eager path
COMMON_FLAGS = ("-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
# A task is whole rows of one chunk, about this many elements (dynamic scheduling over threads).
TASK_NUMEL = 1 << 16
DTYPE_FLAGS = {torch.float32: 0, torch.bfloat16: 1}


@dataclass(frozen=True)
class Library:
    """A loaded build: the ctypes function, the library path and the flags it was built with."""

    step: ctypes._CFuncPtr
    path: Path
    flags: tuple[str, ...]


_library: Library | None = None
_failed: str | None = None


def supports(t: torch.Tensor) -> bool:
    """Whether the kernel takes this tensor as p, g or m (CPU, fp32 or bf16)."""
    return t.device.type == "cpu" and t.dtype in DTYPE_FLAGS


def _compiler() -> str | None:
    explicit = os.environ.get("ADAM_MINI_CXX")
    if explicit:
        return shutil.which(explicit)  # an explicit choice that does not exist: no silent substitute
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What `-march=native` depends on: the machine and, on Linux, the first CPU's model and flags."""
    ident = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
                    ident.append(line.strip())
                if not line.strip() and len(ident) > 2:
                    break  # the first processor is enough
    except OSError:
        pass
    return "\n".join(ident)


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cache_dir() -> Path:
    """The folder for built libraries (created; a temporary one when the usual place is not writable)."""
    env = os.environ.get("ADAM_MINI_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adam-mini-pretrain"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"adam-mini-pretrain-{os.getuid() if hasattr(os, 'getuid') else 0}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _build(cxx: str, flags: tuple[str, ...], out: Path) -> str | None:
    """Compile into `out` atomically; None on success, else the compiler's first error line."""
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, *COMMON_FLAGS, str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line] or lines
            return errors[0].strip() if errors else f"exit {proc.returncode}"
        os.replace(tmp, out)  # concurrent builders (ranks of one node) write identical files
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path, flags: tuple[str, ...]) -> Library:
    lib = ctypes.CDLL(str(path))
    if lib.adam_mini_rows_abi() != ABI:
        raise OSError(f"{path}: ABI {lib.adam_mini_rows_abi()}, expected {ABI}")
    fn = lib.adam_mini_rows_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return Library(fn, path, flags)


def load() -> Library | None:
    """The kernel library, built on first use and cached; None (after one warning) where it cannot be built."""
    global _library, _failed
    if _library is not None or _failed is not None:
        return _library
    cxx = _compiler()
    if cxx is None:
        _failed = "no C++ compiler found (set ADAM_MINI_CXX)"
    elif not SOURCE.is_file():
        _failed = f"kernel source {SOURCE} is missing"
    else:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, _compiler_version(cxx), _cpu_identity(),
                                         repr(FLAG_SETS), repr(COMMON_FLAGS)]).encode()).hexdigest()[:16]
        folder = cache_dir()
        errors = []
        for i, flags in enumerate(FLAG_SETS):
            path = folder / f"adam_mini_rows-{key}-{i}.so"
            if not path.exists():
                err = _build(cxx, flags, path)
                if err is not None:
                    errors.append(f"{' '.join(flags)}: {err}")
                    continue
            try:
                _library = _open(path, flags)
                return _library
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        _failed = f"building {SOURCE.name} with {cxx} failed ({'; '.join(errors)})"
    warnings.warn(f"AdamMini native CPU kernel unavailable: {_failed}; using the compiled/eager path")
    return None


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None while it has not failed)."""
    return _failed


class RowsStep:
    """One step of the native kernel for a fixed list of units (their chunk geometry precomputed).

    Built once per set of units; each call fills the address table (gradients move between steps) and
    runs the kernel once for all of them.
    """

    def __init__(self, chunk_lists: Sequence[Sequence[Chunk]]):
        self.library = load()
        if self.library is None:
            raise RuntimeError(f"the native kernel is unavailable: {unavailable_reason()}")
        self.chunk_lists = [tuple(cs) for cs in chunk_lists]
        # per unit: the elements and v entries its chunks need, and (offset, v entry, rows, length, decay)
        self._needs = [(max((c.offset + c.numel for c in cs), default=0),
                        max((c.block + c.rows for c in cs), default=0)) for cs in self.chunk_lists]
        self._geometry = [tuple((c.offset, c.block, c.rows, c.length, 4 if c.decay else 0) for c in cs)
                          for cs in self.chunk_lists]
        tasks: list[int] = []
        index = 0
        for chunks in self.chunk_lists:
            for c in chunks:
                per = max(1, TASK_NUMEL // c.length)
                for r in range(0, c.rows, per):
                    tasks += (index, r, min(c.rows, r + per))
                index += 1
        self.n_tasks = len(tasks) // 3
        self._tasks = (ctypes.c_int64 * max(1, len(tasks)))(*tasks)
        self._table = (ctypes.c_int64 * max(1, 7 * index))()
        self._hyper = (ctypes.c_double * 8)()

    def __call__(self, tensors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                 hyper: StepHyper, threads: int | None = None) -> None:
        """`tensors[k] = (p, g, m, v)` of unit k: 1-D contiguous CPU views (p, g, m fp32 or bf16; v fp32)."""
        if len(tensors) != len(self.chunk_lists):
            raise ValueError(f"expected {len(self.chunk_lists)} units, got {len(tensors)}")
        table: list[int] = []
        for (p, g, m, v), geometry, (end, v_end) in zip(tensors, self._geometry, self._needs):
            if not (supports(p) and supports(g) and supports(m)) or v.dtype != torch.float32:
                raise TypeError(f"native kernel: unsupported dtypes p={p.dtype} g={g.dtype} m={m.dtype} v={v.dtype}")
            if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                raise ValueError("native kernel: tensors must be contiguous")
            if p.numel() < end or g.numel() < end or m.numel() < end or v.numel() < v_end:
                raise ValueError("native kernel: a tensor is shorter than its chunks")
            pp, gp, mp, vp = p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr()
            ps, gs, ms = p.element_size(), g.element_size(), m.element_size()
            flags = DTYPE_FLAGS[p.dtype] | DTYPE_FLAGS[g.dtype] << 1 | DTYPE_FLAGS[m.dtype] << 3
            for offset, block, rows, length, decay in geometry:
                table += (pp + ps * offset, gp + gs * offset, mp + ms * offset, vp + 4 * block, rows, length,
                          flags | decay)
        if table:
            self._table[:len(table)] = table
        self._hyper[:] = hyper.values()
        threads = torch.get_num_threads() if threads is None else int(threads)
        rc = self.library.step(self._table, self._tasks, self.n_tasks, self._hyper, max(1, threads))
        if rc != 0:  # pragma: no cover - the kernel has no failing path today
            raise RuntimeError(f"native kernel returned {rc}")
