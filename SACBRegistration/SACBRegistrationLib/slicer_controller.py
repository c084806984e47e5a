"""The Slicer module's run state machine without Qt: start, poll, finish, cancel, report.

The widget owns a timer and a view (its widgets); it passes both here and maps button clicks to
:meth:`RegistrationController.start` / :meth:`RegistrationController.cancel`. Everything that
decides what happens when lives here, so it is tested under slicer-core with a fake timer and
view (``Testing/slicer/test_controller.py``).

Order matters when a run ends: the timer is stopped and the job cleared *before* anything is
reported, because a modal error box runs its own event loop, in which the timer would otherwise
fire again and report the same failure in a second box, and a third...
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol

from .vocabulary import SLICER_OUTPUT_NODE_CLASSES, WORKER_RESULT

ERROR_LOG_LINES = 12
"""How many of the worker's last log lines the error dialog shows as details."""


class Timer(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class View(Protocol):
    """What the controller shows; the widget implements it with Qt, tests with a recorder."""

    def setRunning(self, running: bool) -> None: ...

    def appendLog(self, line: str) -> None: ...

    def setProgress(self, percent: int, message: str) -> None: ...

    def showOutputs(self, assignable: Dict[str, Any], outputs: Any) -> None: ...

    def showError(self, message: str, details: str) -> None: ...


def assignable_outputs(outputs: Any) -> Dict[str, Any]:
    """The output nodes that fit the parameter node's fields (a label-map warped segmentation, made
    when the moving segmentation is a label map, does not fit ``warpedSegmentation``)."""
    found = {}
    for name, node_class in SLICER_OUTPUT_NODE_CLASSES.items():
        node = getattr(outputs, name, None)
        if node is not None and node.IsA(node_class):
            found[name] = node
    return found


class RegistrationController:
    """Runs one registration at a time for the widget."""

    def __init__(self, logic: Any, view: View, timer: Timer) -> None:
        self.logic, self.view, self.timer = logic, view, timer
        self.job: Optional[Any] = None
        self._shown = 0

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(self, *inputs: Any, **options: Any) -> None:
        """Start a registration (``logic.startRegistration`` arguments); errors propagate unchanged
        (bad input: nothing was started)."""
        if self.job is not None:
            raise RuntimeError("a registration is already running; cancel it first")
        self.job = self.logic.startRegistration(*inputs, **options)
        self._shown = 0
        self.view.setRunning(True)
        self.timer.start()

    def poll(self) -> None:
        """One timer tick: show new log lines and progress; when the job has ended, finish it."""
        job = self.job
        if job is None:
            return
        try:
            running = job.poll()
        except Exception as error:  # a broken job must end, never stay "running"
            job.state, job.error, running = "failed", f"the registration could not be followed: {error}", False
        self._showLog(job)
        self.view.setProgress(max(0, int(job.progress)), job.message)
        if running:
            return
        self._end()  # first: no tick may see this job again (modal dialogs run event loops)
        if job.state == "succeeded":
            self.view.showOutputs(assignable_outputs(job.outputs), job.outputs)
        elif job.state == "failed":
            self.view.showError(job.error, "\n".join(job.log[-ERROR_LOG_LINES:]))

    def cancel(self) -> None:
        """Stop the running job (its process tree); the scene stays as it was."""
        job = self.job
        if job is None:
            return
        self._end()
        job.cancel()
        self.view.appendLog("Cancelled.")

    def _showLog(self, job: Any) -> None:
        lines: List[str] = job.log[self._shown:]
        self._shown = len(job.log)
        for line in lines:
            if not line.startswith(WORKER_RESULT):
                self.view.appendLog(line)

    def _end(self) -> None:
        self.timer.stop()
        self.job = None
        self._shown = 0
        self.view.setRunning(False)
