"""The demo: Multi30k German->English at a budget that fits a 2-core CPU in under 45
minutes (scripts/demo.sh): the first 4,000 training pairs, all-MiniLM-L6-v2 fine-tuned
for 120 C-MLM steps, and two small students (3+3 layers, d 256) of 500 steps each. This
shows the pipeline working, not the method's effect: see configs/multi30k_de_en.py and
BENCHMARKS.md for longer runs.
"""

import dataclasses

from distill_jax.experiment import (
    DataConfig,
    DecodeConfig,
    DistillConfig,
    ExperimentConfig,
    TeacherConfig,
    TrainConfig,
    default_student,
)


def get_config() -> ExperimentConfig:
    student = dataclasses.replace(
        default_student(),
        d_model=256,
        num_heads=4,
        mlp_dim=1024,
        num_encoder_layers=3,
        num_decoder_layers=3,
        dropout_rate=0.1,
        max_len=128,
    )
    return ExperimentConfig(
        name="demo_multi30k_de_en",
        data=DataConfig(
            train_examples=4000,
            tokens_per_batch=1024,
            bucket_step=16,
            max_src_len=64,
            max_tgt_len=64,
        ),
        teacher=TeacherConfig(
            steps=120,
            tokens_per_batch=1024,
            eval_every=60,
            save_every=60,
            learning_rate=1e-4,
            top_k=8,
        ),
        student=student,
        distill=DistillConfig(kd="offline", alpha=0.5, temperature=10.0, top_k=8),
        train=TrainConfig(
            steps=500,
            learning_rate=1e-3,
            warmup_steps=100,
            eval_every=250,
            save_every=250,
            bleu_sentences=200,
        ),
        decode=DecodeConfig(
            beam_size=4, length_penalty=0.6, max_len_a=1.2, max_len_b=8, tokens_per_batch=2048
        ),
    )
