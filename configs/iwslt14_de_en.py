"""IWSLT14 German->English, the paper's main result (Table 1), with the reference's
hyper-parameters: fairseq's IWSLT14 preprocessing (Moses-tokenized, lowercased), the
bert-base-multilingual-cased C-MLM teacher, and OpenNMT-py Transformer students
(6+6 layers, d 512, pre-LayerNorm with final LayerNorms, eps 1e-6, dropout 0.3 on residuals,
attention weights and feed-forward activations, label smoothing 0.1, Adam (0.9, 0.98) with
eps 1e-9, noam schedule, 6,144-token batches, the final checkpoint reported).

The distilled student (alpha 0.5, T 10, K 8) trains 100k steps with noam factor 2 and 8k
warm-up; the baseline (distill.kd=none) 50k steps with factor 1 and 4k warm-up, which
``baseline_overrides`` applies whenever distill.kd=none (explicit --set flags still win).
The recipe, with commands and the paper's numbers: docs/paper_recipe.md.

  distill-jax prepare --dataset iwslt14_de_en --data-dir DIR_WITH_de-en.tgz \
      --teacher bert-base-multilingual-cased --out WORKDIR/data
  distill-jax train-teacher --config configs/iwslt14_de_en.py --workdir WORKDIR
  distill-jax soft-targets  --config configs/iwslt14_de_en.py --workdir WORKDIR
  distill-jax train-student --config configs/iwslt14_de_en.py --workdir WORKDIR --set distill.kd=none
  distill-jax train-student --config configs/iwslt14_de_en.py --workdir WORKDIR
"""

from distill_jax import experiment

# The reference's baseline: noam factor 1, 4k warm-up, 50k steps.
BASELINE_OVERRIDES = ("train.learning_rate=1.0", "train.warmup_steps=4000", "train.steps=50000")


def get_config() -> experiment.ExperimentConfig:
    return experiment.ExperimentConfig(
        name="iwslt14_de_en",
        # The reference drops training pairs over 150 BERT pieces (151 with </s>).
        data=experiment.DataConfig(
            train_split="train",
            valid_split="valid",
            test_splits=("test",),
            tokens_per_batch=6144,
            max_src_len=152,
            max_tgt_len=152,
        ),
        teacher=experiment.TeacherConfig(
            checkpoint="bert-base-multilingual-cased",
            steps=100000,
            learning_rate=5e-5,
            warmup_fraction=0.05,
            tokens_per_batch=16384,
            eval_every=5000,
            save_every=5000,
            top_k=8,
        ),
        student=experiment.opennmt_student(dropout=0.3),
        distill=experiment.DistillConfig(kd="offline", alpha=0.5, temperature=10.0, top_k=8),
        train=experiment.TrainConfig(
            steps=100000,
            schedule="noam",
            learning_rate=2.0,
            warmup_steps=8000,
            label_smoothing=0.1,
            adam_eps=1e-9,
            eval_every=1000,
            save_every=1000,
            bleu_sentences=1000,
            final_checkpoint="last",
        ),
        decode=experiment.DecodeConfig(beam_size=5, length_penalty=0.6),
        baseline_overrides=BASELINE_OVERRIDES,
    )
