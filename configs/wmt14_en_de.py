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

import dataclasses
import pathlib

from distill_jax import configlib
from distill_jax.experiment import opennmt_student


def get_config():
    """The IWSLT14 reference recipe (configs/iwslt14_de_en.py) with WMT's dropout and
    distillation weights."""
    reference = configlib.load_config_file(
        str(pathlib.Path(__file__).with_name("iwslt14_de_en.py"))
    )
    return dataclasses.replace(
        reference,
        name="wmt14_en_de",
        student=opennmt_student(dropout=0.1),
        distill=dataclasses.replace(reference.distill, alpha=0.1, temperature=5.0),
    )
