"""Turn untrusted image bytes into a PIL image without letting a hostile file hurt the worker.

Bounds, in the order they bite:
- format allowlist (JPEG, PNG/APNG, WebP, GIF, TIFF, BMP, plus AVIF/HEIF where this Pillow has them): every
  other Pillow plugin (PSD, EPS, SGI, J2K, FLI, ICNS, FITS ...) is never even asked to parse the header;
- pixel cap from the header, before any pixel is decoded (``max_pixels``); Pillow's DecompressionBombWarning
  is an error too; zero or negative sizes are refused;
- first frame only: the other frames of an animation are never decoded (not a setting: the detector reads
  one image);
- a full ``load()``, so truncated files fail here with a reason instead of later in the detector;
- time and memory: decoding runs in a separate, long-lived child process (worker/_decode_child.py) under an
  address-space limit; a decode that runs past ``decode_timeout_s`` gets the child killed, one that crashes
  the decoder kills only the child. Either way the caller gets a DecodeError and the next call starts a new
  child.

The child sends back raw pixels plus ``image.info`` (EXIF bytes, ICC profile, PNG text, XMP ...) so EXIF
orientation and provenance can still be read from the returned image; the original ``format`` is set on it
too.

Overhead per image is one pipe round trip (the encoded bytes out, the pixels back); measured by
``bench/decode_overhead.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, Protocol

from PIL import Image, features

from worker import _decode_child as child_protocol

__all__ = ["ALLOWED_FORMATS", "DecodeError", "DecodeSettings", "Decoder", "decode_image", "shutdown_decoder"]

_BASE_FORMATS: Final = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP")
# Memory the child may use on top of what Python and Pillow already mapped: room for the largest allowed image
# in the widest mode Pillow decodes it to (32-bit per channel, 4 channels = 16 bytes/pixel) plus decoder
# buffers.
_BYTES_PER_PIXEL_BUDGET: Final = 16
_MEMORY_FLOOR: Final = 256 << 20
# A fresh child now and then keeps fragmentation left by odd files from accumulating.
_DECODES_PER_CHILD: Final = 1000
_START_TIMEOUT_S: Final = 30.0
_PIPE_BYTES: Final = 1 << 20


def _available_formats() -> tuple[str, ...]:
    Image.init()
    formats: list[str] = [name for name in _BASE_FORMATS if name in Image.OPEN]
    if features.check("avif") and "AVIF" in Image.OPEN:
        formats.append("AVIF")
    if "HEIF" in Image.OPEN:  # registered by pillow-heif when installed
        formats.append("HEIF")
    return tuple(formats)


ALLOWED_FORMATS: Final = _available_formats()


class DecodeSettings(Protocol):
    """The settings decode_image reads (worker.settings.Settings has them all)."""

    @property
    def max_pixels(self) -> int: ...
    @property
    def decode_timeout_s(self) -> float: ...


class DecodeError(Exception):
    """The bytes are not an image we will analyse; ``reason`` is a sentence for the stored check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (DecodeError, (self.reason,))


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class _Spawner:
    """Starts decoding children from one long-lived thread per process.

    The child asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), and for the kernel the
    parent is the *thread* that forked it. Spawned from a short-lived thread, a child would be killed when
    that thread ends, possibly while another thread uses it; spawned here, it lives as long as the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner_pid = -1
        self._requests: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], dict[str, Any]]] = (
            queue.SimpleQueue()
        )

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._owner_pid = -1

    def _serve(self) -> None:
        while True:
            result, kwargs = self._requests.get()
            try:
                # argv is built by Decoder._start: this interpreter and our module.
                result.set_result(subprocess.Popen(**kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                result.set_exception(exc)

    def popen(self, **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._owner_pid != os.getpid():
                # First use in this process (or after a fork: the parent's spawner thread did not come along).
                self._requests = queue.SimpleQueue()
                threading.Thread(target=self._serve, name="synthguard-decoder-spawner", daemon=True).start()
                self._owner_pid = os.getpid()
        result: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((result, kwargs))
        return result.result()


_SPAWNER = _Spawner()


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return _SPAWNER.popen(args=args, **kwargs)


class Decoder:
    """One decoding child process, started on first use and replaced after a crash, timeout or N decodes.

    Thread-safe (one decode at a time). After ``os.fork()`` the child belongs to the parent process: a forked
    Celery pool process notices the pid change and starts its own.
    """

    def __init__(self, memory_bytes: int, max_input_bytes: int = 1 << 31) -> None:
        self.memory_bytes = memory_bytes
        self.max_input_bytes = max_input_bytes
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._decodes = 0
        self._sequence = 0
        self.restarts = 0

    # --- process management ---

    def _start(self) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # Torch/OpenMP thread settings do not matter to Pillow; one thread keeps the child small and
        # predictable.
        env.setdefault("OMP_NUM_THREADS", "1")
        process = _spawn(
            [
                sys.executable,
                "-m",
                "worker._decode_child",
                str(self.memory_bytes),
                str(self.max_input_bytes),
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # libtiff and friends print a line per broken tag of a hostile file; the reason is reported
            # instead.
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            # A Ctrl-C or SIGTERM sent to the worker's process group is for the worker, not for the decoder.
            start_new_session=True,
        )
        self._decodes = 0
        assert process.stdout is not None  # noqa: S101 - Popen with PIPE
        assert process.stdin is not None  # noqa: S101
        _widen_pipe(process.stdin.fileno())
        _widen_pipe(process.stdout.fileno())
        try:
            ready, _ = _read_reply(process.stdout.fileno(), time.monotonic() + _START_TIMEOUT_S)
        except (_ChildTimeoutError, _ChildDiedError):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            status = _signal_name(process.returncode)
            raise DecodeError(f"decoder process failed to start ({status})") from None
        if not ready.get("ready"):
            process.kill()
            process.wait()
            raise DecodeError("decoder process failed to start (unexpected greeting)")
        return process

    def _kill(self) -> None:
        process = self._process
        self._process = None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    def forget_after_fork(self) -> None:
        """In a forked process: drop the parent's child (its pipes are the parent's) and any held lock."""
        self._lock = threading.Lock()
        self._process = None
        self._owner_pid = os.getpid()

    def close(self) -> None:
        """Stop the child (it also exits by itself when this process dies: its stdin closes)."""
        with self._lock:
            if os.getpid() == self._owner_pid:
                self._kill()
            else:
                self._process = None

    def _ensure(self) -> subprocess.Popen[bytes]:
        if os.getpid() != self._owner_pid:
            # Inherited from the parent across fork: its pipes are shared with the parent; leave them alone.
            self._process = None
            self._owner_pid = os.getpid()
        worn_out = self._decodes >= _DECODES_PER_CHILD
        if self._process is not None and (self._process.poll() is not None or worn_out):
            self._kill()
        if self._process is None:
            self._process = self._start()
        return self._process

    # --- one decode ---

    def decode(self, data: bytes, *, max_pixels: int, timeout_s: float) -> Image.Image:
        """Decode the first frame of ``data`` in the child; raise DecodeError with a reason on any failure."""
        if not data:
            raise DecodeError("empty file")
        if len(data) > self.max_input_bytes:
            raise DecodeError(f"file too large: {len(data)} bytes > limit {self.max_input_bytes}")
        with self._lock:
            process = self._ensure()
            self._decodes += 1
            self._sequence += 1
            request = {"seq": self._sequence, "max_pixels": max_pixels, "formats": list(ALLOWED_FORMATS)}
            try:
                header, pixels = self._exchange(process, request, data, timeout_s)
            except _ChildTimeoutError:
                self._kill()
                self.restarts += 1
                raise DecodeError(f"decode timed out after {timeout_s:g} s") from None
            except _ChildDiedError:
                returncode = process.poll()
                if returncode is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        returncode = process.wait(timeout=2)
                self._kill()
                self.restarts += 1
                raise DecodeError(f"decoder crashed ({_signal_name(returncode)})") from None
            except BaseException:
                # Interrupted mid-exchange (a soft time limit, a signal): part of the reply may still be in
                # the pipe, and the next decode would read it as its own. This child is never used again.
                self._kill()
                raise
            if header.get("seq") != request["seq"]:
                self._kill()
                raise DecodeError("decoder protocol error (reply out of sequence); decoder restarted")
            if not header.get("ok") and header.get("fatal"):
                self._kill()
                self.restarts += 1
        if not header.get("ok"):
            raise DecodeError(str(header.get("reason") or "image could not be decoded"))
        return _rebuild(header, pixels)

    def _exchange(
        self,
        process: subprocess.Popen[bytes],
        request: dict[str, Any],
        data: bytes,
        timeout_s: float,
    ) -> tuple[dict[str, Any], bytes]:
        assert process.stdin is not None  # noqa: S101 - Popen with PIPE
        assert process.stdout is not None  # noqa: S101
        until = time.monotonic() + timeout_s
        try:
            child_protocol.write_message(process.stdin, request, data)
        except (BrokenPipeError, OSError):
            raise _ChildDiedError from None
        return _read_reply(process.stdout.fileno(), until)


def _widen_pipe(fd: int) -> None:
    # Pixels cross the pipe: 1 MiB buffers instead of 64 KiB cut the context switches per image by 16x.
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


class _ChildTimeoutError(Exception):
    pass


class _ChildDiedError(Exception):
    pass


class _DeadlineReader:
    """Reads exact byte counts from a pipe, giving up at an absolute monotonic deadline."""

    def __init__(self, fd: int, until: float) -> None:
        self._fd = fd
        self._until = until

    def read_exact(self, size: int) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            left = self._until - time.monotonic()
            if left <= 0:
                raise _ChildTimeoutError
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                raise _ChildTimeoutError
            chunk = os.read(self._fd, min(remaining, 1 << 20))
            if not chunk:
                raise _ChildDiedError
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


def _read_reply(fd: int, until: float) -> tuple[dict[str, Any], bytes]:
    reader = _DeadlineReader(fd, until)
    head_len = child_protocol.HEADER_LEN.unpack(reader.read_exact(child_protocol.HEADER_LEN.size))[0]
    if head_len > child_protocol.MAX_REPLY_HEADER_BYTES:
        raise _ChildDiedError
    try:
        header = json.loads(reader.read_exact(head_len))
    except ValueError:
        raise _ChildDiedError from None
    if not isinstance(header, dict):
        raise _ChildDiedError
    payload_len = child_protocol.PAYLOAD_LEN.unpack(reader.read_exact(child_protocol.PAYLOAD_LEN.size))[0]
    return header, reader.read_exact(payload_len)


def _rebuild(header: dict[str, Any], pixels: bytes) -> Image.Image:
    try:
        mode = str(header["mode"])
        width, height = (int(side) for side in header["size"])
        image = Image.frombytes(mode, (width, height), pixels)
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"decoder returned unusable pixels: {exc}") from None
    info = header.get("info")
    if isinstance(info, dict):
        image.info.update({str(key): child_protocol.decode_value(value) for key, value in info.items()})
    image.format = str(header.get("format") or "") or None
    return image


# --- module-level convenience: one decoder per process
# ---------------------------------------------------------

_decoders: dict[int, Decoder] = {}
_decoders_lock = threading.Lock()


def _memory_budget(max_pixels: int) -> int:
    return max(_MEMORY_FLOOR, max_pixels * _BYTES_PER_PIXEL_BUDGET + _MEMORY_FLOOR)


def _decoder_for(memory_bytes: int) -> Decoder:
    with _decoders_lock:
        decoder = _decoders.get(memory_bytes)
        if decoder is None:
            decoder = Decoder(memory_bytes)
            _decoders[memory_bytes] = decoder
        return decoder


def decode_image(data: bytes, settings: DecodeSettings) -> Image.Image:
    """The first frame of ``data`` as a loaded PIL image, or DecodeError(reason).

    The returned image carries the file's ``info`` (``exif``, ``icc_profile``, PNG text, ...) and ``format``.
    Palette images come back as RGB/RGBA; other modes (L, LA, RGB, RGBA, CMYK, I;16, I, F, 1 ...) unchanged.
    """
    max_pixels = int(settings.max_pixels)
    decoder = _decoder_for(_memory_budget(max_pixels))
    return decoder.decode(data, max_pixels=max_pixels, timeout_s=float(settings.decode_timeout_s))


def _reset_after_fork() -> None:
    # A fork copies locks as they are: one held by another thread of the parent would never be released here.
    # The parent's decoding children belong to the parent; this process starts its own when it needs one.
    global _decoders_lock  # noqa: PLW0603 - module state rebuilt in the new process
    _decoders_lock = threading.Lock()
    _SPAWNER.reset_after_fork()
    for decoder in _decoders.values():
        decoder.forget_after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def shutdown_decoder() -> None:
    """Stop this process's decoding children (e.g. from a worker_process_shutdown signal); optional."""
    with _decoders_lock:
        decoders = list(_decoders.values())
        _decoders.clear()
    for decoder in decoders:
        decoder.close()
