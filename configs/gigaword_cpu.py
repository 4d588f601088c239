"""Gigaword headline generation (the 10k-pair sample in ../shared/data/gigaword_sample) at
a budget this project's 2-core CPU runs in about half an hour: the first 3,000 training
pairs, all-MiniLM-L6-v2 fine-tuned for 300 C-MLM steps, and small students (3+3 layers,
d 256) of 600 steps, checkpoints picked by validation ROUGE-L, ROUGE-1/2/L on `valid`.

  distill-jax prepare --dataset gigaword_sample --data-dir ../shared/data/gigaword_sample \
      --teacher TEACHER --out WORKDIR/data
  scripts/seeds.sh configs/gigaword_cpu.py WORKDIR results/gigaword_cpu.json "0" \
      --set teacher.checkpoint=TEACHER      (after train-teacher and soft-targets)

The recipe is configs/multi30k_cpu.py's, loaded below and changed where Gigaword needs it:
the same students, batches (1,024 tokens, lengths in steps of 16, sources up to 64 pieces),
student learning rate and beam (4, length penalty 0.6). As there, the teacher masks 30% of
target positions and uses a peak learning rate of 2e-4 on 1,024-token batches so that it
learns within the budget.
"""

import dataclasses
import pathlib

from distill_jax import configlib


def get_config():
    """configs/multi30k_cpu.py on the Gigaword sample: its splits, headlines of up to 32
    pieces, a shorter teacher and students, the paper's Gigaword alpha, ROUGE-L selection."""
    cpu = configlib.load_config_file(str(pathlib.Path(__file__).with_name("multi30k_cpu.py")))
    return dataclasses.replace(
        cpu,
        name="gigaword_cpu",
        data=dataclasses.replace(
            cpu.data, valid_split="valid", test_splits=(), train_examples=3000, max_tgt_len=32
        ),
        teacher=dataclasses.replace(
            cpu.teacher, steps=300, eval_every=150, save_every=150, top_k=8
        ),
        # the paper's Gigaword weights (results recorded before this change used alpha 0.5)
        distill=dataclasses.replace(cpu.distill, alpha=0.1),
        train=dataclasses.replace(
            cpu.train,
            steps=600,
            warmup_steps=120,
            eval_every=300,
            save_every=300,
            select_metric="rougeL",
        ),
        # headlines: a fixed length limit instead of one that grows with the source
        decode=dataclasses.replace(cpu.decode, max_len_a=0.0, max_len_b=24),
    )
