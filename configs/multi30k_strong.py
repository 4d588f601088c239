"""Multi30k German->English on all 29,000 training pairs with a teacher strong enough to
teach (#35): configs/multi30k_full.py with 1,600 C-MLM steps instead of 400.

The teacher's learning curve on this data (results/multi30k_full_teacher_curve.json, made
with exactly this teacher section) rises from 51.4% val stride top-1 at 200 steps to 73.6%
at 1,600, against the baseline student's 63.0% next-token accuracy; 400 steps (the
multi30k_full budget) stop at 62.4%, below the student. Validation every 200 steps scores
all 1,014 val pairs (teacher.quality_examples 0), so the curve is part of every run.

The students are multi30k_full's (3+3 layers, d 256, 1,500 updates of 2,048 target tokens).
scripts/kd_experiment.sh runs the whole experiment: the distillation weights are
chosen on val among a few candidates, then three seeds of the baseline and of the chosen
student, then the release-only test sets once.
"""

import dataclasses
import pathlib

from distill_jax import configlib


def get_config():
    """configs/multi30k_full.py with a 1,600-step teacher validated on all of val."""
    full = configlib.load_config_file(str(pathlib.Path(__file__).with_name("multi30k_full.py")))
    return dataclasses.replace(
        full,
        name="multi30k_strong_de_en",
        teacher=dataclasses.replace(
            full.teacher, steps=1600, eval_every=200, save_every=200, quality_examples=0
        ),
    )
