"""A tiny experiment for tests and smoke runs: a 2+2 layer, d 32 student and whatever
small teacher checkpoint is passed with --set teacher.checkpoint=PATH."""

from distill_jax import experiment


def get_config() -> experiment.ExperimentConfig:
    return experiment.ExperimentConfig(
        name="tiny",
        # bucket_step = the length limit: every training batch has one shape, so each program
        # compiles once in the end-to-end tests (the tiny student's train step takes 10-15 s
        # to compile on 8 CPU devices; padding costs nothing at this size).
        data=experiment.DataConfig(
            valid_split="val",
            test_splits=("test2016",),
            tokens_per_batch=512,
            bucket_step=48,
            max_src_len=48,
            max_tgt_len=48,
        ),
        teacher=experiment.TeacherConfig(
            steps=6, tokens_per_batch=512, eval_every=3, save_every=3, top_k=4
        ),
        student=experiment.small_student(d_model=32, mlp_dim=64, layers=2, max_len=64),
        distill=experiment.DistillConfig(kd="offline", top_k=4),
        train=experiment.TrainConfig(
            steps=8,
            learning_rate=1e-3,
            warmup_steps=4,
            eval_every=4,
            save_every=2,
            keep_last=2,
            bleu_sentences=16,
        ),
        decode=experiment.DecodeConfig(
            beam_size=2, max_len_a=1.0, max_len_b=4, tokens_per_batch=256, bucket_step=48
        ),
    )
