"""The demo: Multi30k German->English at a budget that fits a 2-core CPU in under 45
minutes (scripts/demo.sh). A small student (3+3 layers, d 256) trained for a few
thousand steps; the teacher is all-MiniLM-L6-v2 fine-tuned briefly with C-MLM.
"""

import dataclasses

from distill_jax.experiment import (DataConfig, DecodeConfig, DistillConfig, ExperimentConfig,
                                    TeacherConfig, TrainConfig, default_student)


def get_config() -> ExperimentConfig:
    student = dataclasses.replace(
        default_student(), d_model=256, num_heads=4, mlp_dim=1024, num_encoder_layers=3,
        num_decoder_layers=3, dropout_rate=0.1, max_len=128)
    return ExperimentConfig(
        name="demo_multi30k_de_en",
        data=DataConfig(tokens_per_batch=3072, max_src_len=64, max_tgt_len=64),
        teacher=TeacherConfig(steps=600, tokens_per_batch=3072, eval_every=300,
                              save_every=300, learning_rate=1e-4, top_k=8),
        student=student,
        distill=DistillConfig(kd="offline", alpha=0.5, temperature=10.0, top_k=8),
        train=TrainConfig(steps=2400, learning_rate=1e-3, warmup_steps=400, eval_every=800,
                          save_every=400, bleu_sentences=300),
        decode=DecodeConfig(beam_size=4, length_penalty=0.6, max_len_a=1.2, max_len_b=8,
                            tokens_per_batch=2048),
    )
