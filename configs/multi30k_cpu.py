"""Multi30k German->English at the largest budget this project's 2-core CPU runs in about
two hours (teacher + 3 seeds of each student): the first 4,000 training pairs,
all-MiniLM-L6-v2 fine-tuned for 1,000 C-MLM steps and small students (3+3 layers, d 256,
experiment.small_student) of 1,000 steps. Used for the README's results table
(scripts/seeds.sh).

Two departures from the paper's hyper-parameters, both to make the teacher learn within
the budget, both stated with the results: the C-MLM masks 30% of target positions in
fine-tuning (paper: 15%; soft-target extraction still masks one position in 7), which
doubles the supervised positions per step, and the peak learning rate is 2e-4 on
1,024-token batches (paper: 5e-5 on ~16k-token batches). Soft targets keep K = 32
so the K ablation (1, 8, 32) needs no second extraction; training uses K = 8.

configs/demo_multi30k.py, multi30k_full.py (and through it multi30k_strong.py) and
gigaword_cpu.py load this file and change some fields: a change here changes them too.
"""

from distill_jax import experiment


def get_config() -> experiment.ExperimentConfig:
    return experiment.ExperimentConfig(
        name="multi30k_cpu_de_en",
        data=experiment.DataConfig(
            train_examples=4000,
            tokens_per_batch=1024,
            bucket_step=16,
            max_src_len=64,
            max_tgt_len=64,
        ),
        teacher=experiment.TeacherConfig(
            steps=1000,
            tokens_per_batch=1024,
            eval_every=250,
            save_every=250,
            learning_rate=2e-4,
            mask_rate=0.3,
            top_k=32,
        ),
        student=experiment.small_student(),
        distill=experiment.DistillConfig(kd="offline", alpha=0.5, temperature=10.0, top_k=8),
        train=experiment.TrainConfig(
            steps=1000,
            learning_rate=1e-3,
            warmup_steps=200,
            eval_every=500,
            save_every=500,
            bleu_sentences=200,
        ),
        decode=experiment.DecodeConfig(
            beam_size=4, length_penalty=0.6, max_len_a=1.2, max_len_b=8, tokens_per_batch=2048
        ),
    )
