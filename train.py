"""Train SegFormer.

    python train.py                                        # built-in synthetic data, b0, 1-5 min on a CPU
    python train.py --config configs/ade20k.py:b2 --workdir runs/ade_b2 --config.batch_size=8
    python -m segformer_jax.evaluate --config configs/ade20k.py:b2 --checkpoint runs/ade_b2

Rerunning the same command resumes from the latest checkpoint in --workdir.

SIGTERM / SIGINT (a preemption, Ctrl-C): the current step finishes, its checkpoint is written and the
exit code is 75; rerun the same command to resume. A second Ctrl-C aborts at once (130). Errors: 1.
(segformer_jax/training/preemption.py, README "Preemption".)
"""

import os
import resource
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from segformer_jax import hugepages
from segformer_jax.xla_options import DEFAULT_COMPILATION_CACHE, enable_compilation_cache

_HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_HERE, "configs", "default.py"),
    "Training config file, optionally with a variant: configs/ade20k.py:b2. Override fields with "
    "--config.<field>=<value>.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    os.path.join(_HERE, "runs", "default"),
    "Directory for checkpoints, logs and the final model (resumed if it exists).",
)
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    DEFAULT_COMPILATION_CACHE,
    "Persistent XLA compilation cache ('' = off): a resumed run skips recompiling the same programs.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    from segformer_jax import training

    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache(_CACHE.value)
    training.maybe_initialize_distributed(_CONFIG.value)
    try:
        result = training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except training.TrainingError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    # ru_maxrss: KiB on Linux; the whole process (tf.data, XLA, checkpoints), compare with other trainers
    print(f"Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    if result.get("preempted"):
        print(f"To resume: python {shlex.join(sys.argv)}", flush=True)
        if jax.process_count() == 1:
            # Everything is written and closed; skip the interpreter's teardown (seconds of TF / tf.data
            # threads) inside the grace period. Several hosts exit normally (jax.distributed shutdown).
            logging.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(training.EXIT_PREEMPTED)
        sys.exit(training.EXIT_PREEMPTED)


if __name__ == "__main__":
    hugepages.reexec_with_hugepages()  # the training step 1.4-1.7x faster on CPU (segformer_jax/hugepages.py)
    app.run(main)
