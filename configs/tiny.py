"""A tiny experiment for tests and smoke runs: a 2+2 layer, d 32 student and whatever
small teacher checkpoint is passed with --set teacher.checkpoint=PATH."""

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
        d_model=32,
        num_heads=4,
        mlp_dim=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.1,
        max_len=64,
    )
    return ExperimentConfig(
        name="tiny",
        # bucket_step = the length limit: every training batch has one shape, so each program
        # compiles once in the end-to-end tests (the tiny student's train step takes 10-15 s
        # to compile on 8 CPU devices; padding costs nothing at this size).
        data=DataConfig(
            valid_split="val",
            test_splits=("test2016",),
            tokens_per_batch=512,
            bucket_step=48,
            max_src_len=48,
            max_tgt_len=48,
        ),
        teacher=TeacherConfig(steps=6, tokens_per_batch=512, eval_every=3, save_every=3, top_k=4),
        student=student,
        distill=DistillConfig(kd="offline", top_k=4),
        train=TrainConfig(
            steps=8,
            learning_rate=1e-3,
            warmup_steps=4,
            eval_every=4,
            save_every=2,
            keep_last=2,
            bleu_sentences=16,
        ),
        decode=DecodeConfig(
            beam_size=2, max_len_a=1.0, max_len_b=4, tokens_per_batch=256, bucket_step=48
        ),
    )
