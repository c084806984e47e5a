"""Process-level helpers: huge pages are only a default, freed memory goes back to the system, torch
can be imported in the background, and our worker threads leave SIGTERM to the main thread."""

import signal
import sys

import pytest

from SACBRegistrationLib.runtime import HUGE_PAGES, enable_huge_pages, release_memory


def test_huge_pages_are_a_default_the_user_can_override():
    environment = {}
    enable_huge_pages(environment)
    assert environment == {HUGE_PAGES: "1"}
    chosen = {HUGE_PAGES: "0"}
    enable_huge_pages(chosen)
    assert chosen == {HUGE_PAGES: "0"}


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
