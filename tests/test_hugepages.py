"""The huge-page malloc setting the command-line tools restart with (segformer_jax/hugepages.py): the
GLIBC_TUNABLES it writes, when it applies, the restart itself, and that it changes how large blocks
are faulted in."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from segformer_jax import hugepages

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Restarts itself, then touches three fresh 64 MiB blocks (each a new mmap, unmapped when freed, as
# XLA's scratch is) and reports the page faults that took.
PROBE = """
import json, os, resource, sys
pid = os.getpid()
from segformer_jax import hugepages
hugepages.reexec_with_hugepages()
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # malloc, not numpy: numpy asks for huge pages on its own large arrays
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pid": pid, "pid_after": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "faults": faults, "argv": sys.argv[1:]}))
"""


def test_tunables_string():
    assert hugepages.with_hugepages("") == "glibc.malloc.hugetlb=1"
    assert hugepages.with_hugepages("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.with_hugepages("a=1::b=2") == "a=1:b=2:glibc.malloc.hugetlb=1"
    # the user's own value stands, whatever it is
    assert hugepages.with_hugepages("glibc.malloc.hugetlb=0") is None
    assert hugepages.with_hugepages("x=1:glibc.malloc.hugetlb=2") is None


def test_thp_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    path.write_text("always madvise [never]\n")
    assert hugepages.thp_mode(str(path)) == "never"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_opt_out_and_disabled_environment(monkeypatch):
    monkeypatch.setenv(hugepages.OPT_OUT_ENV, "0")
    assert hugepages.why_not() == f"{hugepages.OPT_OUT_ENV}=0"
    assert hugepages.environment({"GLIBC_TUNABLES": "a=1"})["GLIBC_TUNABLES"] == "a=1"
    monkeypatch.delenv(hugepages.OPT_OUT_ENV)
    off = hugepages.environment({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}, enabled=False)
    assert off["GLIBC_TUNABLES"] == "a=1" and off[hugepages.OPT_OUT_ENV] == "0"


def _probe(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT_ENV)}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-u", "-c", PROBE, "--flag", "two words"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(hugepages.why_not() is not None, reason=f"huge-page malloc n/a here: {hugepages.why_not()}")
def test_restart_sets_tunable_and_cuts_page_faults():
    plain = _probe({hugepages.OPT_OUT_ENV: "0"})
    huge = _probe({})
    assert plain["tunables"] is None and plain["pid"] == plain["pid_after"]
    assert huge["tunables"] == "glibc.malloc.hugetlb=1"
    assert huge["pid"] == huge["pid_after"]  # replaced in place: launchers and signals see one process
    assert huge["argv"] == plain["argv"] == ["--flag", "two words"]
    # 3 x 64 MiB: ~49,000 faults of 4 KiB pages; with huge pages ~100 of 2 MiB (more where the kernel
    # found no free huge page and fell back)
    assert plain["faults"] > 40_000, plain
    assert huge["faults"] < plain["faults"] / 4, (huge, plain)


def test_an_existing_setting_is_kept():
    out = _probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert out["tunables"] == "glibc.malloc.hugetlb=0"


@pytest.mark.parametrize("path", ["train.py", "segformer_jax/evaluate.py"])
def test_tools_restart_first(path):
    """The training and evaluation tools restart before running (their `__main__` block's first call)."""
    tree = ast.parse((ROOT / path).read_text())
    (main_block,) = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    calls = [ast.unparse(n.value) for n in main_block.body if isinstance(n, ast.Expr)]
    assert calls[0] == "hugepages.reexec_with_hugepages()", calls
