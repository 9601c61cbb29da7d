"""Helpers for the robustness and kill suites: makers of bad (and valid-but-odd) input files, checks of
output folders, and a fast CLI runner that still runs the real ``unmask`` entry point in its own process.

``CliServer`` imports torch, the package and the dlib models once, then forks one child per command: the
child points file descriptors 1 and 2 at files, optionally lowers RLIMIT_FSIZE (a full disk) or drops
root's permission-override capabilities (so file modes apply to root as to any user), and calls
``unmask_cli.cli.main()`` exactly as ``python -m unmask_cli`` does; an exception escaping ``main()``
prints the interpreter's usual traceback. So stdout, stderr and the exit code are what a user sees, at a
fraction of the cost of a cold start (imports alone take 3-8 s on a loaded 2-core machine).
``tests/test_robustness.py`` checks it against a cold ``python -m unmask_cli`` run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask_cli.fileio import TMP_MARK

REPO = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------------------- images

def jpeg_bytes(rgb: np.ndarray, quality: int = 92, **kwargs) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def png_bytes(image, mode: str | None = None) -> bytes:
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(image, mode) if mode else Image.fromarray(image)
    buffer = io.BytesIO()
    img.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def write(path: Path | bytes, data: bytes) -> Path | bytes:
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def half(data: bytes) -> bytes:
    """The first half of a file, as left by an interrupted copy or download."""
    return data[: len(data) // 2]


def gray(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))


def rgba(rgb: np.ndarray) -> np.ndarray:
    """Opaque face, transparent 40-px border (composited over white by read_image)."""
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:40] = alpha[-40:] = 0
    alpha[:, :40] = alpha[:, -40:] = 0
    return np.dstack([rgb, alpha])


def gray16_png(rgb: np.ndarray) -> bytes:
    """A real 16-bit greyscale PNG (PIL mode I;16) of the photo."""
    from PIL import Image

    return png_bytes(Image.fromarray(gray(rgb).astype(np.uint16) * 257))


def exif_rotated_jpeg(upright: np.ndarray) -> bytes:
    """A JPEG whose pixels are stored rotated 90 degrees counter-clockwise, with EXIF orientation 6
    ("rotate 90 CW to display"): viewers (and unmask) show ``upright``."""
    from PIL import Image

    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def tiled(face: np.ndarray, rows: int = 2, cols: int = 3) -> np.ndarray:
    """One image holding ``rows`` x ``cols`` copies of a face crop (a group photo)."""
    return np.concatenate([np.concatenate([face] * cols, axis=1)] * rows, axis=0)


def huge_jpeg(face: np.ndarray, side: int = 8000, scale: int = 4) -> bytes:
    """A side x side JPEG (64 megapixels for 8000): flat grey with the photo enlarged ``scale`` times in
    the middle. Flat 8x8 blocks cost a few bytes, so the file is ~1.5 MB and quick to write."""
    import cv2

    big = np.full((side, side, 3), 200, np.uint8)
    inner = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    top = (side - inner.shape[0]) // 2
    left = (side - inner.shape[1]) // 2
    big[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buffer.tobytes()


def animated_gif(rgb: np.ndarray, frames: int = 3) -> bytes:
    """An animated GIF (adaptive palette) whose first frame is the photo, then darker copies of it."""
    from PIL import Image

    images = [Image.fromarray((rgb * (1 - 0.2 * i)).astype(np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
              for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=200, loop=0)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 20000) -> bytes:
    """A decompression bomb: a valid PNG header declaring side x side RGB pixels (1.2 GB decoded for 20000)
    with a few rows of data. The pixel-count guard must refuse it before decoding."""
    rows = zlib.compress((b"\x00" + bytes(side * 3)) * 4, 9)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<circle cx="32" cy="32" r="20" fill="tan"/></svg>\n')
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
       b"newpath 32 32 20 0 360 arc closepath fill\nshowpage\n%%EOF\n")


# ------------------------------------------------------------------------------------- untrusted files

class Evil:
    """Unpickling this runs ``touch MARKER`` (os.system): a checkpoint must never execute it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path, how: str = "torch") -> Path:
    """A file that runs a shell command when loaded without ``weights_only``: ``torch`` = torch.save of an
    unmask-looking payload (zip format), ``pickle`` = a bare protocol-2 pickle."""
    import torch

    if how == "torch":
        torch.save({"format": "unmask-checkpoint", "version": 1, "epoch": 1, "global_step": 1,
                    "config": {}, "networks": {"G": Evil(marker)}}, path)
    else:
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    return path


# --------------------------------------------------------------------------------------- output checks

def leftovers(folder: Path) -> list[str]:
    """Temporary files (``.unmask-tmp-``) and zero-byte files anywhere under ``folder``."""
    bad = []
    for path in Path(folder).rglob("*"):
        if TMP_MARK in path.name:
            bad.append(f"temporary file {path}")
        elif path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
            bad.append(f"zero-byte file {path}")
    return bad


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ the runner

@dataclass
class CliResult:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def error_line(self, code: int = 1) -> str:
        """The one non-empty stderr line of a fatal error (asserts the exit code, one line, no traceback)."""
        assert self.code == code, f"exit code {self.code}, expected {code}\n{self.describe()}"
        assert len(self.err_lines) == 1, f"expected one stderr line\n{self.describe()}"
        line = self.err_lines[0]
        assert line.startswith("error: "), self.describe()
        return line

    def ok(self) -> CliResult:
        assert self.code == 0, self.describe()
        assert not self.err_lines, f"stderr not empty on success\n{self.describe()}"
        return self

    def describe(self) -> str:
        return (f"$ unmask {' '.join(self.args)}\nexit {self.code} after {self.seconds:.1f} s\n"
                f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}")


SERVER = r"""
import json, os, resource, signal, sys, time, traceback
import torch, torchvision.models  # the slow imports, once
import unmask_cli.cli as cli
import unmask_cli.inference
import unmask_cli.prepare
unmask_cli.inference._aligner(None, "yunet", "visible")  # face models, loaded once (both jobs keep them per process)
unmask_cli.prepare._init_worker(64, None, 1, 32, "yunet", "visible", 1.0, None, False, 0.0, 0.0, False)  # 64-px; another size reloads
for name in ("prepare", "inference", "evaluation", "training", "identity", "vgg", "faces", "masks", "data",
             "checkpoints", "metrics", "baselines", "models", "losses", "config", "fileio"):
    __import__("unmask_cli." + name)
import cv2, dlib, PIL.Image
PIL.Image.init()
import ctypes


def drop_dac_override():
    # root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: file modes apply to it like to any user
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & keep)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    status = open("/proc/self/status").read()
    effective = int(status.split("CapEff:")[1].split()[0], 16)
    assert not effective & 0b110, "capabilities still effective"


protocol = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing but the protocol goes to the pipe
protocol.write("ready\n"); protocol.flush()
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid != 0:
        protocol.write(json.dumps({"pid": pid}) + "\n"); protocol.flush()
    else:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(out, 1); os.dup2(err, 2)
            os.setsid()
            signal.alarm(job["timeout"])
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            if job["fsize"]:
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
            if job["unprivileged"] and os.geteuid() == 0:
                drop_dac_override()
            sys.argv = ["unmask", *job["args"]]
            try:
                cli.main()
                code = 0
            except SystemExit as exc:  # what the interpreter does with it
                if exc.code is None:
                    code = 0
                elif isinstance(exc.code, int):
                    code = exc.code
                else:
                    print(exc.code, file=sys.stderr); code = 1
            except BaseException:
                traceback.print_exc(); code = 1
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    protocol.write(json.dumps({"code": os.waitstatus_to_exitcode(status),
                               "seconds": time.perf_counter() - start}) + "\n")
    protocol.flush()
"""


class Running:
    """One command started by :class:`CliServer` (a forked child in its own session: pgid == pid)."""

    def __init__(self, server: CliServer, args: tuple[str, ...], out: Path, err: Path):
        self.server, self.args, self.out, self.err = server, args, out, err
        self.pid = int(json.loads(server._readline())["pid"])
        self.result: CliResult | None = None

    def poll(self) -> CliResult | None:
        """The result if the command has ended, else None (never blocks)."""
        if self.result is None:
            line = self.server._readline(timeout=0)
            if line is not None:
                self._finish(line)
        return self.result

    def wait(self) -> CliResult:
        if self.result is None:
            self._finish(self.server._readline())
        return self.result

    def _finish(self, line: str) -> None:
        reply = json.loads(line)
        read = lambda p: p.read_bytes().decode("utf-8", errors="surrogateescape")  # noqa: E731
        self.result = CliResult(self.args, reply["code"], read(self.out), read(self.err), reply["seconds"])
        self.server.busy = None

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")


class CliServer:
    """Runs ``unmask ARGS`` in a fresh forked process per call (see the module doc); one at a time."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.busy: Running | None = None
        self._buffer = b""
        self.server_stderr = self.workdir / "server.stderr"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "120"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.server_stderr, "wb"), env=env, cwd=REPO, bufsize=0)
        assert self._readline(timeout=300) == "ready\n", self.server_stderr.read_text()

    def _readline(self, timeout: float | None = None) -> str | None:
        """The next protocol line; with ``timeout``, None when none arrives in time."""
        import select

        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 65536)
            assert chunk, f"CLI server died: {self.server_stderr.read_text()}"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode() + "\n"

    def start(self, *args: str | os.PathLike, cwd: Path | None = None, env: dict | None = None,
              fsize: int | None = None, unprivileged: bool = False, timeout: int = 300) -> Running:
        """Start ``unmask ARGS``. ``fsize``: RLIMIT_FSIZE in bytes (writes beyond fail with EFBIG, like a full
        disk); ``unprivileged``: as root, drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH so file modes apply."""
        assert self.busy is None, "one command at a time"
        self.count += 1
        out = self.workdir / f"{self.count:03d}.stdout"
        err = self.workdir / f"{self.count:03d}.stderr"
        out.touch()
        err.touch()
        argv = tuple(os.fsdecode(a) for a in args)
        job = {"args": argv, "cwd": str(cwd or self.workdir), "env": env or {}, "fsize": fsize,
               "unprivileged": unprivileged, "timeout": timeout, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.busy = Running(self, argv, out, err)
        return self.busy

    def __call__(self, *args: str | os.PathLike, **kwargs) -> CliResult:
        return self.start(*args, **kwargs).wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SHARED: CliServer | None = None


def shared_server() -> CliServer:
    """One server for the whole pytest session (its start-up imports torch: ~5-8 s); closed at exit."""
    global _SHARED
    if _SHARED is None or _SHARED.proc.poll() is not None:
        import atexit
        import shutil
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="unmask-cli-server-"))
        _SHARED = CliServer(workdir)
        atexit.register(shutil.rmtree, workdir, True)
        atexit.register(_SHARED.close)
    return _SHARED


def cold_cli(*args: str | os.PathLike, cwd: Path | None = None, timeout: int = 300, env: dict | None = None,
             **kwargs) -> CliResult:
    """``python -m unmask_cli ARGS`` from a cold start (a fresh interpreter); ``env`` adds variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "120", **(env or {})}
    argv = tuple(os.fsdecode(a) for a in args)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "unmask_cli", *argv], cwd=cwd, env=env, capture_output=True,
                          timeout=timeout, **kwargs)
    decode = lambda b: b.decode("utf-8", errors="surrogateescape")  # noqa: E731
    return CliResult(argv, proc.returncode, decode(proc.stdout), decode(proc.stderr), time.perf_counter() - start)
