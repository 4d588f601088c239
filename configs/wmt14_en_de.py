"""WMT14 English->German with the reference's student (the OpenNMT-py Transformer:
6+6 layers, d 512, pre-LayerNorm, eps 1e-6, noam schedule, the final checkpoint reported),
the paper's WMT distillation weights (alpha 0.1, T 5) and the bert-base-multilingual-cased
teacher. The data is the TFDS catalog's wmt14_translate/de-en (its builder needs TensorFlow:
pip install 'distill-jax[tf]'); it is raw text, so results are detokenized sacreBLEU
(``distill-jax evaluate --metric all`` adds tokenized BLEU).

Not from the paper's sources: dropout 0.1 (the Transformer-base value for WMT; the
reference's IWSLT student uses 0.3) and the schedules, which are the reference's IWSLT ones
(distilled: noam factor 2, 8k warm-up, 100k steps; the baseline, through baseline_overrides:
factor 1, 4k warm-up, 50k steps). See docs/paper_recipe.md.

  distill-jax prepare --dataset wmt14_translate/de-en --direction en-de \\
      --teacher bert-base-multilingual-cased --out WORKDIR/data
  distill-jax train-teacher --config configs/wmt14_en_de.py --workdir WORKDIR
  distill-jax soft-targets  --config configs/wmt14_en_de.py --workdir WORKDIR
  distill-jax train-student --config configs/wmt14_en_de.py --workdir WORKDIR --set distill.kd=none
  distill-jax train-student --config configs/wmt14_en_de.py --workdir WORKDIR
"""

from distill_jax.experiment import (DataConfig, DecodeConfig, DistillConfig, ExperimentConfig,
                                    TeacherConfig, TrainConfig, opennmt_student)

# The reference's IWSLT baseline schedule: noam factor 1, 4k warm-up, 50k steps.
BASELINE_OVERRIDES = ("train.learning_rate=1.0", "train.warmup_steps=4000",
                      "train.steps=50000")


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="wmt14_en_de",
        data=DataConfig(train_split="train", valid_split="valid", test_splits=("test",),
                        tokens_per_batch=6144, max_src_len=152, max_tgt_len=152),
        teacher=TeacherConfig(checkpoint="bert-base-multilingual-cased", steps=100000,
                              learning_rate=5e-5, warmup_fraction=0.05,
                              tokens_per_batch=16384, eval_every=5000, save_every=5000,
                              top_k=8),
        student=opennmt_student(dropout=0.1),
        distill=DistillConfig(kd="offline", alpha=0.1, temperature=5.0, top_k=8),
        train=TrainConfig(steps=100000, schedule="noam", learning_rate=2.0, warmup_steps=8000,
                          label_smoothing=0.1, eval_every=1000, save_every=1000,
                          bleu_sentences=1000, final_checkpoint="last"),
        decode=DecodeConfig(beam_size=5, length_penalty=0.6),
        baseline_overrides=BASELINE_OVERRIDES,
    )
