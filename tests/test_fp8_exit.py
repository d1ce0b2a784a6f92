"""fp8 kernels never abort the interpreter at exit, and are cached in kvtier's named cache directory.

The defect: a process ending while the fp8 warm-up (a daemon thread) was inside numba aborted with "terminate
called without an active exception", status 134, when finalization let that thread unwind through numba's C++
frames: 2-4 runs in 10, depending on timing. The race is forced here: each script waits for numba's compile
event from the warm-up thread (an empty cache, so that it compiles), then ends at once; a last atexit handler
checks that no warm-up thread is left when finalization begins, which fails every run of the old code, and
the process must exit 0 without the abort's message.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WAIT_FOR_COMPILE = textwrap.dedent(
    """
    import atexit, os, sys, threading
    from numba.core import event

    def no_warm_up_left():
        # registered first, so it runs last of the atexit handlers, just before finalization: a warm-up thread
        # still alive here would be inside numba while the interpreter tears down (the abort's precondition)
        if any(t.name == "kvtier-fp8-warm-up" and t.is_alive() for t in threading.enumerate()):
            sys.stderr.write("warm-up thread alive at finalization")
            sys.stderr.flush()
            os._exit(5)

    atexit.register(no_warm_up_left)

    started = threading.Event()

    class OnCompile(event.Listener):
        def on_start(self, ev):
            started.set()

        def on_end(self, ev):
            pass

    event.register("numba:compile", OnCompile())
    """
)

BARE = WAIT_FOR_COMPILE + textwrap.dedent(
    """
    from kvtier.serde import create_serde_processor

    create_serde_processor({"type": "fp8"})
    if not started.wait(120):
        sys.exit(3)
    # the interpreter ends here, with the warm-up thread inside a compile
    """
)

STORE = WAIT_FOR_COMPILE + textwrap.dedent(
    """
    import kvtier

    store = kvtier.Store(
        l1_size_gb=0.01,
        l2_adapters=[{"type": "fs", "base_path": sys.argv[1], "serde": {"type": "fp8"}}],
    )
    if not started.wait(120):
        sys.exit(3)
    store.close()
    """
)

CACHED = WAIT_FOR_COMPILE + textwrap.dedent(
    """
    import kvtier.serde.fp8 as fp8

    fp8.start_warm_up(fp8.FP8_DTYPES["float8_e4m3fn"], True)
    for t in list(fp8._warm_threads):
        t.join()
    print("compiled" if started.is_set() else "loaded")
    """
)


def run(script: str, cache: Path, *args: str, numba_dir: Path | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["KVTIER_CACHE_DIR"] = str(cache)
    if numba_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_dir)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.timeout(900)  # ten cold compiles of the kernels (3-4 s each idle), two at a time on a busy machine
def test_exit_during_the_kernel_compile_never_aborts(tmp_path: Path) -> None:
    results = []
    for batch in range(5):  # 10 runs, two at a time
        procs = [  # NUMBA_CACHE_DIR: an empty cache whatever the kvtier version does with KVTIER_CACHE_DIR
            run(BARE, tmp_path, numba_dir=tmp_path / f"bare{batch}"),
            run(STORE, tmp_path, str(tmp_path / f"l2-{batch}"), numba_dir=tmp_path / f"store{batch}"),
        ]
        for p in procs:
            _, err = p.communicate(timeout=240)
            results.append((p.returncode, err))
    failed = [(rc, err[-300:]) for rc, err in results if rc != 0 or "terminate called" in err]
    assert not failed, f"{len(failed)} of {len(results)} runs failed: {failed[:2]}"


def test_kernels_are_cached_in_the_kvtier_cache_dir(tmp_path: Path) -> None:
    first = run(CACHED, tmp_path)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-500:]
    assert out.strip() == "compiled"
    index_files = list((tmp_path / "numba").rglob("*.nbi"))
    assert index_files, "the compiled kernels are in $KVTIER_CACHE_DIR/numba"
    second = run(CACHED, tmp_path)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-500:]
    assert out.strip() == "loaded", "a second process loads the kernels from the cache, no compile"


def test_numba_cache_dir_set_by_the_user_wins(tmp_path: Path) -> None:
    env = {**os.environ, "KVTIER_CACHE_DIR": str(tmp_path / "kvtier"), "NUMBA_CACHE_DIR": str(tmp_path / "user")}
    cmd = [sys.executable, "-c", CACHED]
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-500:]
    assert list((tmp_path / "user").rglob("*.nbi")) and not (tmp_path / "kvtier").exists()
