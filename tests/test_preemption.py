"""Preemption and checkpoint integrity with real processes: train.py (tiny config) is sent SIGTERM /
SIGINT / SIGKILL at chosen and random points (during a step, an async save, an eval, the first
compilation); every rerun ends bit-identical (parameters, optimiser state, BN statistics) to one
uninterrupted run, shared by the module. Damaged latest checkpoints, a full disk (a small tmpfs) and a
read-only workdir. The interruption points are random with a printed seed (PREEMPTION_SEED=...
repeats one)."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_training import REPO, load_config

from segformer_jax import training

STEPS = 6
RUN_FLAGS = [
    f"--config.total_steps={STEPS}",
    "--config.checkpoint.every_steps=2",  # checkpoints at 2, 4 (async) and after the evals at 3, 6
    "--config.eval.every_steps=3",
    "--config.log_every_steps=1",
    "--config.progress_bar=False",
]
SEED = int(os.environ.get("PREEMPTION_SEED", random.randrange(1 << 30)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from segformer_jax.data import synthetic_shapes

    path = str(tmp_path_factory.mktemp("tfds"))
    synthetic_shapes.ensure_prepared(path, "small")
    return path


def _config(data_dir):
    config = load_config()
    config.data.data_dir = data_dir
    config.total_steps = STEPS
    config.checkpoint.every_steps = 2
    config.eval.every_steps = 3
    config.log_every_steps = 1
    config.progress_bar = False
    return config


class Run:
    """train.py in a subprocess, stdout / stderr to files (no pipe to fill up)."""

    def __init__(self, workdir, data_dir, compile_cache):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        logs = os.path.join(os.path.dirname(self.workdir), f".{os.path.basename(self.workdir)}-{time.time_ns()}")
        self.out_path, self.err_path = logs + ".out", logs + ".err"
        cmd = [
            sys.executable,
            os.path.join(REPO, "train.py"),
            f"--config={os.path.join(REPO, 'configs', 'default.py')}:tiny",
            f"--workdir={self.workdir}",
            f"--config.data.data_dir={data_dir}",
            f"--compilation_cache={compile_cache}",
            *RUN_FLAGS,
        ]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}
            )
        self.started = time.time()

    @property
    def stdout(self):
        return open(self.out_path).read()

    @property
    def stderr(self):
        return open(self.err_path).read()

    def train_records(self) -> int:
        try:
            with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
                return sum('"split": "train"' in line for line in f)
        except FileNotFoundError:
            return 0

    def wait_for(self, condition, timeout=300):
        """Poll until `condition()`; False if the process ended first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting; stderr:\n{self.stderr[-3000:]}")

    def send(self, sig):
        self.proc.send_signal(sig)
        self.signalled = time.time()

    def wait(self, timeout=600):
        rc = self.proc.wait(timeout=timeout)
        self.exited = time.time()
        return rc


def _state(workdir, step):
    return training.restore_state_here(os.path.join(workdir, training.CHECKPOINT_DIR, str(step)))


def assert_bit_identical(workdir, reference_dir, step=STEPS):
    got, want = _state(workdir, step), _state(reference_dir, step)
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_structure(got)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_structure(want)
    assert tree_a == tree_b
    assert {k for k in got} >= {"params", "opt_state", "batch_stats"}
    for (path, a), (_, b) in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, training.CHECKPOINT_DIR)) if s.isdigit())


def _hash_tree(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_dir, compile_cache):
    """One uninterrupted run (it also fills the compilation cache the interrupted runs use)."""
    run = Run(tmp_path_factory.mktemp("baseline") / "w", data_dir, compile_cache)
    assert run.wait() == 0, run.stderr[-4000:]
    assert _steps(run.workdir)[-1] == STEPS
    return run.workdir


def _finish(workdir, data_dir, compile_cache):
    run = Run(workdir, data_dir, compile_cache)
    assert run.wait() == 0, run.stderr[-4000:]
    assert "Resuming from checkpoint" in run.stdout
    return run


def _expect_preempted(run, signame="SIGTERM"):
    rc = run.wait()
    assert rc == training.EXIT_PREEMPTED, f"exit code {rc}\n{run.stderr[-4000:]}"
    assert f"Stopped by {signame} at step" in run.stdout and "To resume: python" in run.stdout, run.stdout
    stopped = int(run.stdout.split("Stopped by")[1].split("at step ")[1].split()[0])
    return stopped


# ----------------------------------------------------------------------------- signals


def test_sigterm_during_eval_save_and_step_and_kill9_resume_bit_identical(baseline, tmp_path, data_dir, compile_cache):
    """One run interrupted four ways in a row, then finished: SIGTERM during the eval at step 3, a kill -9
    at a random point, SIGTERM right after step 4 (its async save in flight), SIGTERM at a random point."""
    rng = random.Random(SEED)
    print(f"PREEMPTION_SEED={SEED}")
    workdir = str(tmp_path / "w")

    run = Run(workdir, data_dir, compile_cache)  # 1. during the evaluation of step 3
    run.wait_for(lambda: run.train_records() >= 3)
    run.send(signal.SIGTERM)
    assert _expect_preempted(run) == 3
    assert _steps(workdir) == [2, 3] and not os.path.exists(os.path.join(workdir, "final"))
    print(f"SIGTERM during eval: exit {run.exited - run.signalled:.2f} s after the signal")

    run = Run(workdir, data_dir, compile_cache)  # 2. kill -9 anywhere in the next steps
    run.wait_for(lambda: "Data:" in run.stdout)
    time.sleep(rng.uniform(0.0, 4.0))
    run.send(signal.SIGKILL)
    assert run.wait() in (-signal.SIGKILL, 0)

    run = Run(workdir, data_dir, compile_cache)  # 3. just after step 4: its checkpoint is being written
    if run.wait_for(lambda: run.train_records() >= 4):
        run.send(signal.SIGTERM)
        assert _expect_preempted(run) >= 4
    else:
        assert run.proc.returncode == 0

    if _steps(workdir)[-1] < STEPS:  # 4. SIGTERM at a random point of what is left
        run = Run(workdir, data_dir, compile_cache)
        run.wait_for(lambda: "Data:" in run.stdout)
        time.sleep(rng.uniform(0.0, 3.0))
        run.send(signal.SIGTERM)
        assert run.wait() in (training.EXIT_PREEMPTED, 0), run.stderr[-3000:]

    _finish(workdir, data_dir, compile_cache)
    assert_bit_identical(workdir, baseline)
    evals = [json_line for json_line in open(os.path.join(workdir, "metrics.jsonl")) if '"split": "eval"' in json_line]
    assert {int(e.split('"step": ')[1].split(",")[0]) for e in evals} == {3, 6}  # no evaluation lost


def test_signal_before_the_first_step_writes_nothing_over_a_good_checkpoint(
    baseline, tmp_path, data_dir, compile_cache
):
    """SIGTERM during the set-up of a resumed run: no checkpoint of the restored step is written again
    (and none of step 0); the good one is untouched, byte for byte."""
    workdir = str(tmp_path / "w")
    shutil.copytree(os.path.join(baseline, training.CHECKPOINT_DIR, "4"), os.path.join(workdir, "checkpoints", "4"))
    shutil.copy(os.path.join(baseline, "config.json"), workdir)
    before = _hash_tree(os.path.join(workdir, "checkpoints", "4"))
    run = Run(workdir, data_dir, compile_cache)
    run.wait_for(lambda: "Resuming from checkpoint at step 4" in run.stdout)
    run.send(signal.SIGTERM)
    stopped = _expect_preempted(run)
    assert stopped in (4, 5), run.stdout  # 5: the signal came after the first step had been dispatched
    assert _steps(workdir) == ([4] if stopped == 4 else [4, 5])
    assert _hash_tree(os.path.join(workdir, "checkpoints", "4")) == before
    if stopped == 4:
        assert "nothing written" in run.stdout
    # (resuming from an untouched checkpoint is bit-identical: the first test)


def test_second_sigint_aborts_at_once(tmp_path, data_dir, compile_cache, baseline):
    """Ctrl-C during the steps, Ctrl-C again: killed by SIGINT at once (the shell's 130), no waiting for
    the step or the checkpoint."""
    workdir = tmp_path / "w"
    run = Run(workdir, data_dir, compile_cache)
    run.wait_for(lambda: run.train_records() >= 1)
    run.send(signal.SIGINT)
    time.sleep(0.05)
    run.send(signal.SIGINT)
    rc = run.wait()
    assert rc in (-signal.SIGINT, training.EXIT_PREEMPTED), run.stderr[-3000:]
    if rc == -signal.SIGINT:  # (EXIT_PREEMPTED: it had already finished stopping within the 0.05 s)
        assert run.exited - run.signalled < 3.0
        assert "SIGINT received" in run.stderr and "Stopped by" not in run.stdout
    # (what it leaves is what a kill -9 leaves: the first test resumes from that bit-identically)


@pytest.mark.slow
def test_ten_random_interruptions_end_bit_identical(baseline, tmp_path, data_dir, compile_cache):
    """SIGTERM and kill -9 mixed, at random moments of ten consecutive runs of one workdir."""
    rng = random.Random(SEED + 1)
    print(f"PREEMPTION_SEED={SEED}")
    workdir = str(tmp_path / "w")
    for i in range(10):
        run = Run(workdir, data_dir, compile_cache)
        # 0-2 more logged steps, then up to 1.5 s: setup, compilation, steps, saves and evals all get hit
        target = run.train_records() + rng.randint(0, 2)
        run.wait_for(lambda r=run, t=target: "Data:" in r.stdout and r.train_records() >= t)
        sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
        time.sleep(rng.uniform(0.0, 1.5))
        if run.proc.poll() is None:
            run.send(sig)
        rc = run.wait()
        print(f"interruption {i}: {sig.name}, exit {rc}, checkpoints {_steps(workdir)}")
        allowed = {0, training.EXIT_PREEMPTED} if sig == signal.SIGTERM else {0, -signal.SIGKILL}
        assert rc in allowed, run.stderr[-3000:]
    run = Run(workdir, data_dir, compile_cache)
    assert run.wait() == 0, run.stderr[-4000:]
    assert_bit_identical(workdir, baseline)


# ----------------------------------------------------------------------------- checkpoint integrity


def _copy_without_final(baseline, workdir):
    shutil.copytree(baseline, workdir, ignore=shutil.ignore_patterns("final", "eval_results.json"))


def _damage_array_file(step_dir):
    path = os.path.join(step_dir, "state", "d")
    name = max(os.listdir(path), key=lambda n: os.path.getsize(os.path.join(path, n)))
    with open(os.path.join(path, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, name)) // 2)


def _damage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as f:
        f.truncate(100)


def _delete_arrays(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state", "d"))


@pytest.mark.parametrize("damage", [_damage_array_file, _damage_metadata, _delete_arrays])
def test_unreadable_latest_checkpoint_is_reported_and_the_previous_one_used(
    baseline, tmp_path, data_dir, capsys, damage
):
    workdir = str(tmp_path / "w")
    _copy_without_final(baseline, workdir)
    damage(os.path.join(workdir, "checkpoints", str(STEPS)))
    result = training.train_and_evaluate(_config(data_dir), workdir)
    err = capsys.readouterr().err
    assert f"checkpoint {workdir}/checkpoints/{STEPS} is unreadable" in err, err
    assert "resuming from the previous one (step 4)" in err
    assert result["step"] == STEPS and "preempted" not in result
    moved = os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    assert len(moved) == 1 and moved[0].startswith(f"{STEPS}-")
    assert_bit_identical(workdir, baseline)


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}; needs root / CAP_SYS_ADMIN)")
    return path


@pytest.fixture
def small_tmpfs(tmp_path):
    mounted = []

    def mount(options="size=16m"):
        path = _mount_tmpfs(tmp_path / f"tmpfs{len(mounted)}", options)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_is_one_clear_error_and_the_previous_checkpoint_resumes(baseline, small_tmpfs, data_dir, capsys):
    disk = small_tmpfs("size=8m")
    workdir = os.path.join(disk, "w")
    os.makedirs(os.path.join(workdir, "checkpoints"))
    shutil.copytree(os.path.join(baseline, "checkpoints", "4"), os.path.join(workdir, "checkpoints", "4"))
    shutil.copy(os.path.join(baseline, "config.json"), workdir)
    # Fill the disk but ~200 KB: the logs of steps 5-6 fit, the checkpoint of step 6 (1.4 MB) does not.
    filler = os.path.join(disk, "filler")
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    os.truncate(filler, os.path.getsize(filler) - 200_000)
    with pytest.raises(training.TrainingError) as info:
        training.train_and_evaluate(_config(data_dir), workdir)
    message = str(info.value)
    print(message)
    assert f"the disk of the workdir {workdir} is full" in message
    assert "the previous checkpoint (step 4) is intact" in message and "rerun the same command" in message
    assert _steps(workdir) == [4]
    os.remove(filler)
    result = training.train_and_evaluate(_config(data_dir), workdir)
    assert result["step"] == STEPS
    assert_bit_identical(workdir, baseline)
    assert not any("tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))


def test_read_only_workdir_is_refused_before_training(small_tmpfs, tmp_path, data_dir):
    if os.geteuid() == 0:
        workdir = small_tmpfs("size=1m,ro")
    else:
        workdir = tmp_path / "ro"
        workdir.mkdir()
        workdir.chmod(0o555)
    t0 = time.time()
    with pytest.raises(training.TrainingError, match=rf"workdir {workdir} is not writable .*--workdir"):
        training.train_and_evaluate(_config(data_dir), str(workdir))
    assert time.time() - t0 < 5  # refused before any compilation


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(tmp_path, data_dir):
    """Two JAX processes (gloo on one CPU host): SIGTERM to process 1 only. JAX's preemption sync
    manager tells process 0; both stop at the same step and write one complete checkpoint, and a
    rerun of both resumes from it and finishes."""
    from test_training import _free_port

    workdir = str(tmp_path / "w")

    def start_both():
        port, procs = _free_port(), []
        for rank in range(2):
            env = {
                **os.environ,
                "SEGFORMER_MULTI_HOST": "1",
                "SEGFORMER_COORDINATOR": f"127.0.0.1:{port}",
                "SEGFORMER_NUM_PROCESSES": "2",
                "SEGFORMER_PROCESS_ID": str(rank),
                "JAX_PLATFORMS": "cpu",
            }
            cmd = [
                sys.executable,
                os.path.join(REPO, "train.py"),
                f"--config={os.path.join(REPO, 'configs', 'default.py')}:tiny",
                f"--config.data.data_dir={data_dir}",
                f"--workdir={workdir}",
                "--compilation_cache=",
                *RUN_FLAGS,
            ]
            out = open(tmp_path / f"p{rank}-{time.time_ns()}.out", "w+")
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env), out))
        return procs

    procs = start_both()
    records = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(records) and sum('"train"' in line for line in open(records)) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p, _ in procs), "the run ended early"
        time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGTERM)
    outs = []
    for p, out in procs:
        rc = p.wait(timeout=300)
        out.seek(0)
        outs.append(out.read())
        assert rc == training.EXIT_PREEMPTED, f"exit {rc}:\n{outs[-1][-3000:]}"
    stopped = int(outs[0].split("Stopped by")[1].split("at step ")[1].split()[0])
    assert stopped < STEPS and _steps(workdir)[-1] == stopped
    training.restore_state_here(os.path.join(workdir, "checkpoints", str(stopped)))  # complete and readable
    procs = start_both()
    for p, _ in procs:
        assert p.wait(timeout=600) == 0
    assert _steps(workdir)[-1] == STEPS
