"""Process-level helpers: freed memory is kept for reuse in one-job processes and goes back to the
system in long-lived ones, torch can be imported in the background, and our worker threads leave
SIGTERM to the main thread."""

import signal
import sys

import pytest

from SACBRegistrationLib.runtime import release_memory

_HEAP_OF_TEN_BUFFERS = """
import ctypes, sys, torch
from SACBRegistrationLib.runtime import release_memory, retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
    assert not release_memory()  # kept: this process ends after its job
sbrk = ctypes.CDLL("libc.so.6").sbrk
sbrk.restype = ctypes.c_void_p
buffers = [torch.ones(5 << 20) for _ in range(10)]  # ten 20 MB buffers (a 1 mm float32 image each)
top = sbrk(0)  # the end of the heap
in_heap = all(b.data_ptr() < top for b in buffers)
del buffers
print(in_heap, sbrk(0) == top)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_retained_memory_keeps_image_buffers_on_the_heap_for_reuse():
    """``retain_freed_memory`` (the ``sacb`` command, the worker): 20 MB buffers come from the heap
    instead of fresh memory mappings (by default the first ones are mapped, and every mapping's pages
    are faulted in and zeroed again), and freeing 200 MB does not shrink the heap. Run in fresh
    processes: the setting is process-wide."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")

    def run(mode):
        result = subprocess.run([sys.executable, "-c", _HEAP_OF_TEN_BUFFERS, mode], capture_output=True, text=True,
                                check=True)
        return result.stdout.split()
    assert run("retain") == ["True", "True"]
    assert run("default") == ["False", "True"]  # the check can fail: glibc's defaults map these buffers


def test_release_memory_runs_on_glibc_and_is_harmless_elsewhere():
    import platform

    ran = release_memory()
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert ran is on_glibc
    assert release_memory() is ran  # repeatable


def test_limit_memory_retention_applies_on_glibc_only():
    import platform

    from SACBRegistrationLib.runtime import limit_memory_retention

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert limit_memory_retention() is on_glibc


def test_import_in_background_loads_the_module_and_swallows_errors(monkeypatch):
    import sys

    from SACBRegistrationLib.runtime import import_in_background

    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    thread = import_in_background("colorsys")
    thread.join(timeout=30)
    assert not thread.is_alive() and thread.daemon
    assert "colorsys" in sys.modules
    failing = import_in_background("no_such_module_for_sacb")  # reported by the main thread's own import
    failing.join(timeout=30)
    assert not failing.is_alive() and "no_such_module_for_sacb" not in sys.modules


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks only")
def test_worker_threads_leave_sigterm_to_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    from SACBRegistrationLib.runtime import keep_signals_for_main_thread

    def mask() -> set:
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    with ThreadPoolExecutor(1, initializer=keep_signals_for_main_thread) as pool:
        in_worker = pool.submit(mask).result()
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(mask).result()
    assert {signal.SIGINT, signal.SIGTERM} <= in_worker
    assert signal.SIGTERM not in plain and signal.SIGTERM not in mask()  # only the initialised thread


def test_parallel_map_keeps_the_order_uses_threads_of_ours_and_reports_errors(monkeypatch):
    import os
    import signal
    import threading

    from SACBRegistrationLib.runtime import parallel_map

    main = threading.get_ident()

    def work(item):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set()) if hasattr(signal, "pthread_sigmask") else set()
        return item * item, threading.get_ident(), signal.SIGTERM in blocked

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    out = parallel_map(work, range(7))
    assert [square for square, _, _ in out] == [k * k for k in range(7)]
    assert all(thread != main for _, thread, _ in out)  # worker threads ...
    if hasattr(signal, "pthread_sigmask"):
        assert all(blocked for _, _, blocked in out)  # ... that leave SIGTERM to the main thread
    # one CPU or one item: the caller's own thread
    assert parallel_map(work, [3])[0][:2] == (9, main)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert {thread for _, thread, _ in parallel_map(work, range(4))} == {main}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(ZeroDivisionError):
        parallel_map(lambda k: 1 // k, [1, 0, 2])
