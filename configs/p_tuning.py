r"""p-tuning: few-shot sentiment with N learned prompt tokens, [MASK] slots and the text.

Variants (as ``configs/pet.py``, whose fields it shares): ``demo`` (a small scratch BERT masked
LM, the default), ``bert-base-chinese``, ``roberta-wwm-ext``, ``macbert-base``,
``ernie-3.0-base`` (need ``--config.model.path=DIR``). ``--config.model.prompt_tokens=15``
gives the original's longer prompt.

Run the demo:

  python main.py --config=configs/p_tuning.py --workdir=workdirs/p_tuning

It prints what PET's demo prints (``Each Class Metrics are: {...}``,
``best F1 performance updated: A --> B``, the test score of the best checkpoint), and
``--mode=predict`` gives ``{"text": ..., "label": ..., "word": ...}`` per line.

Measured on a 2-core CPU machine (weighted F1; majority class: accuracy 0.500, weighted F1
0.333 on both splits):

  run                      dev F1 (best step)   test F1 (accuracy)   wall
  majority class           0.333                0.333 (0.500)        -
  p_tuning demo (N = 6)    0.522 (120)          0.547 (0.562)        2m50s

(load average ~14 from other trainings on the 2 cores.) As with PET's demo, a scratch masked
LM has no language knowledge for the prompt to draw on: see configs/pet.py and
docs/tasks/pet.md.
"""

import ml_collections

from configs import pet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    c = pet.prompt_config("p_tuning", arg or "demo")
    # Learned prompt tokens [unused1]..[unusedN] in front of the slots (the original: 6 or 15).
    c.model.prompt_tokens = 6
    return c
