"""Multi30k German->English, the paper's setting at the reference sizes: the
all-MiniLM-L6-v2 BERT as the C-MLM teacher and the 6+6 layer, d 512 Transformer student.

  distill-jax prepare --dataset multi30k --direction de-en --data-dir ../shared/data/multi30k \
      --teacher sentence-transformers/all-MiniLM-L6-v2 --out WORKDIR/data
  distill-jax train-teacher --config configs/multi30k_de_en.py --workdir WORKDIR
  distill-jax soft-targets  --config configs/multi30k_de_en.py --workdir WORKDIR
  distill-jax train-student --config configs/multi30k_de_en.py --workdir WORKDIR --set distill.kd=none
  distill-jax train-student --config configs/multi30k_de_en.py --workdir WORKDIR
"""

from distill_jax import experiment


def get_config() -> experiment.ExperimentConfig:
    return experiment.ExperimentConfig(
        name="multi30k_de_en",
        data=experiment.DataConfig(
            train_split="train", valid_split="val", test_splits=("test2016",), tokens_per_batch=4096
        ),
        teacher=experiment.TeacherConfig(
            checkpoint="sentence-transformers/all-MiniLM-L6-v2",
            steps=3000,
            tokens_per_batch=4096,
            eval_every=500,
            save_every=500,
            top_k=8,
        ),
        student=experiment.default_student(),
        distill=experiment.DistillConfig(kd="offline", alpha=0.5, temperature=10.0, top_k=8),
        train=experiment.TrainConfig(
            steps=20000,
            learning_rate=5e-4,
            warmup_steps=4000,
            eval_every=1000,
            save_every=1000,
            average_last=5,
        ),
        decode=experiment.DecodeConfig(beam_size=5, length_penalty=0.6),
    )
