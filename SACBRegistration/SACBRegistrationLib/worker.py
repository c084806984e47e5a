"""The background worker of the Slicer module: one registration per process.

The Slicer Logic writes the inputs (NRRD / NIfTI via MRML storage nodes) and a request file,
starts ``PythonSlicer -m SACBRegistrationLib.worker request.json`` (or ``sacb worker``), reads
the lines it prints and loads the results. Request (JSON)::

    {"fixed": "...", "moving": "...", "fixed_segmentation": null, "moving_segmentation": null,
     "fixed_mask": null, "output": "<folder>", "options": {<RegistrationOptions fields>}, "label_names": {"1": "..."}}

Printed lines: ``PROGRESS <0-100|-1> <message>`` while working, then one
``RESULT <json report>`` or ``ERROR <kind> <message>``; the exit code follows ``sacb``'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import Failure, classify
from .vocabulary import EXIT_CODES, WORKER_ERROR, WORKER_RESULT


def run_request(request_path: Path) -> int:
    from .progress import worker_progress

    try:
        request = json.loads(Path(request_path).read_text())
        from .pipeline import RegistrationOptions, register

        options = dict(request.get("options") or {})
        options["label_names"] = {int(k): v for k, v in (request.get("label_names") or {}).items()}
        result = register(request["fixed"], request["moving"], request.get("fixed_segmentation"),
                          request.get("moving_segmentation"), RegistrationOptions(**options),
                          progress=worker_progress(sys.stdout), fixed_mask=request.get("fixed_mask"))
        files = result.save(request["output"], overview=request.get("overview", True),
                            extras=tuple(request.get("extras") or ()))
        report = dict(result.report(), outputs={k: str(v) for k, v in files.items()})
        print(f"{WORKER_RESULT}{json.dumps(report, default=str)}", flush=True)
        return 0
    except BaseException as error:  # the parent shows this message to the user
        if isinstance(error, (KeyError, json.JSONDecodeError, OSError)):
            failure = Failure(EXIT_CODES["input"], "input", f"bad worker request {request_path}: {error}")
        else:
            failure = classify(error)
        message = " ".join(failure.message.split())
        print(f"{WORKER_ERROR}{failure.kind} {message}", flush=True)
        if failure.code == EXIT_CODES["unexpected"]:
            import traceback
            traceback.print_exc()
        return failure.code


def main() -> int:
    from .runtime import retain_freed_memory
    retain_freed_memory()  # one registration per worker process: reuse freed buffers (measured faster)
    if len(sys.argv) != 2:
        print("usage: python -m SACBRegistrationLib.worker REQUEST.json", file=sys.stderr)
        return 2
    return run_request(Path(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
