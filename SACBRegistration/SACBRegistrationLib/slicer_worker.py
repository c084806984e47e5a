"""The worker process of a Slicer registration: its command and environment, starting and ending it
(with its children), and :class:`RegistrationJob`, which follows it.

The engine runs in a separate Python process (Slicer's ``PythonSlicer``, or the current interpreter
outside Slicer) that prints ``PROGRESS`` lines, then ``RESULT <report>`` or ``ERROR <kind> <message>``
(:mod:`.worker`). ``RegistrationJob.poll()`` is non-blocking (the widget calls it from a timer);
``wait()`` blocks (scripting and tests). No torch is imported in this process.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import slicer

from .progress import parse_worker_line
from .slicer_errors import RegistrationError
from .vocabulary import WORKER_ERROR, WORKER_RESULT

if TYPE_CHECKING:  # annotations only
    from .slicer_logic import RegistrationLogic
    from .slicer_results import RegistrationOutputs

MODULE_DIR = Path(__file__).resolve().parents[1]
"""The folder holding ``SACBRegistrationLib`` (put on the worker's ``PYTHONPATH``)."""

_log = logging.getLogger(__name__)


def findPythonSlicer() -> Optional[str]:
    """Slicer's Python interpreter: on PATH inside Slicer, else next to the running executable."""
    if getattr(slicer, "app", None) is None:
        return None  # outside Slicer: the current interpreter serves
    found = shutil.which("PythonSlicer")
    if found:
        return found
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file():
            return str(candidate)
    raise RegistrationError("PythonSlicer was not found next to Slicer; the registration worker cannot start.")


def workerCommand(request: Path, pythonExecutable: Optional[str] = None) -> List[str]:
    """The command running the worker on ``request`` (a request JSON file) with ``pythonExecutable``
    (default: ``PythonSlicer`` inside Slicer, the current interpreter elsewhere)."""
    executable = pythonExecutable or findPythonSlicer() or sys.executable
    return [executable, "-m", "SACBRegistrationLib.worker", str(request)]


def launchWorker(command: List[str]) -> subprocess.Popen:
    """Start ``command`` leading its own process group (so cancelling ends its children too), with
    :data:`MODULE_DIR` on its ``PYTHONPATH``, unbuffered UTF-8 output and standard error merged in."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [environment.get("PYTHONPATH")] if p])
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"  # the worker writes UTF-8 whatever the system locale
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                   encoding="utf-8", errors="replace", bufsize=1, env=environment)
    if os.name == "posix":
        options["start_new_session"] = True  # its own process group: cancel ends its children too
    else:  # Windows: own process group, no console window
        options["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                    | getattr(subprocess, "CREATE_NO_WINDOW", 0))
    return subprocess.Popen(command, **options)


def killProcessTree(process: subprocess.Popen) -> None:
    """End the worker and everything it started. POSIX: the worker leads its own process group.
    Windows: ``PythonSlicer`` is a launcher whose child does the work, and psutil is not bundled with
    Slicer, so ``taskkill /F /T`` ends the whole tree (``process.kill()`` alone would stop only the
    launcher and leave the registration running)."""
    if os.name == "posix":
        try:
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False,
                   creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    if process.poll() is None:
        process.kill()


class RegistrationJob:
    """A registration running in a worker process.

    Attributes: ``state`` (``"running" | "succeeded" | "failed" | "cancelled"``), ``progress``
    (0-100, or -1 when unknown), ``message``, ``log`` (every line the worker printed),
    ``outputs`` (:class:`RegistrationOutputs` once succeeded), ``error`` (message once failed).
    """

    def __init__(self, logic: "RegistrationLogic", process: subprocess.Popen, workDir: Path, request: Dict[str, Any],
                 load: Callable[[Dict[str, Any]], "RegistrationOutputs"],
                 progressCallback: Optional[Callable[[int, str], None]] = None, keepWorkDir: bool = False) -> None:
        self.keepWorkDir = keepWorkDir
        self.logic = logic
        self.process = process
        self.workDir = workDir
        self.request = request
        self._load = load
        self._progressCallback = progressCallback
        self.state = "running"
        self.progress = 0
        self.message = "starting"
        self.log: List[str] = []
        self.outputs: Optional["RegistrationOutputs"] = None
        self.error = ""
        self._result: Optional[Dict[str, Any]] = None
        self._errorLine: Optional[str] = None
        if keepWorkDir:
            self._noteKept()
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _noteKept(self) -> None:
        note = f"Temporary files kept in {self.workDir} (delete the folder when done)"
        self.log.append(note)
        _log.info("SACBRegistration: %s", note)

    def _removeWorkDir(self) -> None:
        if self.keepWorkDir:
            self._noteKept()
        else:
            shutil.rmtree(self.workDir, ignore_errors=True)

    def _read(self) -> None:
        try:
            for line in iter(self.process.stdout.readline, ""):
                self._lines.put(line.rstrip("\n"))
        except Exception as error:  # the job must fail, never stay "running"
            self._lines.put(f"{WORKER_ERROR}internal reading the registration process's output failed: {error}")
            killProcessTree(self.process)
        finally:
            self._lines.put(None)

    def _handle(self, line: str) -> None:
        self.log.append(line)
        parsed = parse_worker_line(line)
        if parsed is not None:
            percent, message = parsed
            self.progress = -1 if percent is None else percent
            self.message = message
            if self._progressCallback:
                self._progressCallback(self.progress, message)
        elif line.startswith(WORKER_RESULT):
            self._result = json.loads(line[len(WORKER_RESULT):])
        elif line.startswith(WORKER_ERROR):
            self._errorLine = line[len(WORKER_ERROR):]

    def poll(self) -> bool:
        """Process what the worker printed; when it has ended, load the results (on this thread).
        Returns True while the job is still running."""
        if self.state != "running":
            return False
        finished = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                finished = True
                break
            self._handle(line)
        if finished:
            self.process.wait()
            self._finish()
        return self.state == "running"

    def _finish(self) -> None:
        try:
            if self._result is not None and self.process.returncode == 0:
                self.outputs = self._load(self._result)
                self.state = "succeeded"
                self.progress, self.message = 100, "done"
            else:
                self.state = "failed"
                if self._errorLine:
                    kind, _, message = self._errorLine.partition(" ")
                    self.error = message if kind != "internal" else (
                        f"{message} (unexpected error in the registration engine; details in the log)")
                else:
                    tail = "; ".join(self.log[-3:]) or "no output"
                    self.error = (f"The registration process stopped unexpectedly (exit code {self.process.returncode}); "
                                  f"last messages: {tail}")
        except Exception as error:  # loading failed: nothing was kept in the scene
            self.state = "failed"
            self.error = str(error)
        finally:
            self._removeWorkDir()

    def cancel(self) -> None:
        """Stop the worker and its children; temporary files go; the scene is left as it was."""
        if self.state != "running":
            return
        killProcessTree(self.process)
        self.process.wait()
        self.state = "cancelled"
        self.message = "cancelled"
        self._removeWorkDir()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> "RegistrationOutputs":
        """Block until done; return the outputs or raise :class:`RegistrationError`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise RegistrationError(f"The registration did not finish within {timeout:.0f} s and was cancelled.")
            time.sleep(interval)
        if self.state == "succeeded":
            return self.outputs
        if self.state == "cancelled":
            raise RegistrationError("The registration was cancelled.")
        raise RegistrationError(self.error)
