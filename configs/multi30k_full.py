"""Multi30k German->English on all 29,000 training pairs, sized so that one run of
scripts/experiment.sh with two seeds (teacher, soft targets, then a baseline and a distilled
student per seed) finishes in under 150 minutes on 2 CPU cores:

  scripts/experiment.sh multi30k configs/multi30k_full.py runs/full \
      results/multi30k_full_seeds.json "0 1"

How the budget was sized (2 cores of an AMD EPYC; the measured stage times are in
BENCHMARKS.md, "Multi30k on all pairs"): the student below trains at about 1,500 target
tokens/s, so 1,500 updates of 2,048-token batches (about 64 pairs each, 3.3 epochs) take
22-25 minutes with their validation and test decoding; the teacher's soft targets over
29,000 pairs cost 7 masked copies of every pair (33 minutes); 400 C-MLM updates take 22.

The students are those of configs/multi30k_cpu.py (3+3 layers, d 256); the teacher
keeps that config's two departures from the paper's fine-tuning hyper-parameters (30% of
target positions masked in fine-tuning, peak learning rate 2e-4), on batches twice as
large. Distillation uses the paper's De-En weights (alpha 0.5, T 10, K 8).
"""

import dataclasses
import pathlib

from distill_jax import configlib


def get_config():
    """configs/multi30k_cpu.py (the same students and teacher recipe) on every pair, with
    larger batches, a shorter teacher and longer students."""
    cpu = configlib.load_config_file(str(pathlib.Path(__file__).with_name("multi30k_cpu.py")))
    return dataclasses.replace(
        cpu,
        name="multi30k_full_de_en",
        data=dataclasses.replace(cpu.data, train_examples=0, tokens_per_batch=2048, bucket_step=8),
        teacher=dataclasses.replace(
            cpu.teacher, steps=400, tokens_per_batch=2048, eval_every=200, save_every=200, top_k=8
        ),
        train=dataclasses.replace(cpu.train, steps=1500, warmup_steps=300, bleu_sentences=0),
    )
