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

from distill_jax.experiment import (DataConfig, DecodeConfig, DistillConfig, ExperimentConfig,
                                    TeacherConfig, TrainConfig, default_student)


def get_config() -> ExperimentConfig:
    student = dataclasses.replace(
        default_student(), d_model=256, num_heads=4, mlp_dim=1024, num_encoder_layers=3,
        num_decoder_layers=3, dropout_rate=0.1, max_len=128)
    return ExperimentConfig(
        name="multi30k_full_de_en",
        data=DataConfig(train_examples=0, tokens_per_batch=2048, bucket_step=8,
                        max_src_len=64, max_tgt_len=64),
        teacher=TeacherConfig(steps=400, tokens_per_batch=2048, eval_every=200,
                              save_every=200, learning_rate=2e-4, mask_rate=0.3, top_k=8),
        student=student,
        distill=DistillConfig(kd="offline", alpha=0.5, temperature=10.0, top_k=8),
        train=TrainConfig(steps=1500, learning_rate=1e-3, warmup_steps=300, eval_every=500,
                          save_every=500, bleu_sentences=0),
        decode=DecodeConfig(beam_size=4, length_penalty=0.6, max_len_a=1.2, max_len_b=8,
                            tokens_per_batch=2048),
    )
