"""IWSLT15 English->Vietnamese, the paper's En-Vi result, with the reference's IWSLT student
(the OpenNMT-py Transformer: 6+6 layers, d 512, pre-LayerNorm, eps 1e-6, dropout 0.3, noam
schedule, the final checkpoint reported), the paper's En-Vi distillation weights (alpha 0.1,
T 5) and the bert-base-multilingual-cased teacher, which keeps case and Vietnamese
diacritics (an uncased teacher's tokenizer would strip them). The data is the Stanford NMT
group's copy (Moses-tokenized, cased): train 133,317 pairs, valid = tst2012 (1,553), test =
tst2013 (1,268); prepare downloads the six files, or reads them from --data-dir, and checks
their published line counts. Scores: ``bleu_tok`` (tokenized BLEU with Moses rules for
``vi``) beside detokenized ``bleu``. The reference's scoring script (run_mt.sh, for De-En)
calls ``multi-bleu.perl`` without ``-lc``, which on cased data is case-sensitive: score a
hypothesis file that way with ``distill-jax evaluate --metric bleu_tok --tok-cased --lang vi
--ref-tokenized --hyp WORKDIR/students/NAME/test.hyp.txt --ref tst2013.vi``.

Not from the paper's sources (the reference publishes De-En scripts only): everything else
is the IWSLT14 De-En recipe (configs/iwslt14_de_en.py) reused as it is: the student and its
dropout 0.3, the schedules (distilled: noam factor 2, 8k warm-up, 100k steps; the baseline,
through baseline_overrides: factor 1, 4k warm-up, 50k steps), Adam eps 1e-9, label smoothing
0.1, 6,144-token batches, the 150-piece length limit, the teacher's fine-tuning (100k steps,
AdamW 5e-5, top-8 soft targets) and beam 5 with length penalty 0.6. See
docs/paper_recipe.md.

  distill-jax prepare --dataset iwslt15_en_vi --teacher bert-base-multilingual-cased \\
      --out WORKDIR/data                       (add --data-dir DIR to read the six files there)
  distill-jax train-teacher --config configs/iwslt15_en_vi.py --workdir WORKDIR
  distill-jax soft-targets  --config configs/iwslt15_en_vi.py --workdir WORKDIR
  distill-jax train-student --config configs/iwslt15_en_vi.py --workdir WORKDIR --set distill.kd=none
  distill-jax train-student --config configs/iwslt15_en_vi.py --workdir WORKDIR
"""

import dataclasses
import pathlib

from distill_jax import configlib


def get_config():
    """The IWSLT14 reference recipe (configs/iwslt14_de_en.py) with the En-Vi data splits and
    distillation weights."""
    reference = configlib.load_config_file(
        str(pathlib.Path(__file__).with_name("iwslt14_de_en.py"))
    )
    return dataclasses.replace(
        reference,
        name="iwslt15_en_vi",
        data=dataclasses.replace(reference.data, valid_split="valid", test_splits=("test",)),
        teacher=dataclasses.replace(reference.teacher, checkpoint="bert-base-multilingual-cased"),
        distill=dataclasses.replace(reference.distill, alpha=0.1, temperature=5.0),
    )
