"""PASS: a visual prompt and a recurrent hypernetwork learn channel masks with the backbone frozen.

``method`` (the registered ``pass`` method and its hypernetwork artefact), ``search`` (stage 1: prompt
+ hypernetwork training), ``hypernet`` (the LSTM walk over the groups), ``stats`` (the weight
statistics it reads). The folder is ``pass_`` because ``pass`` is a Python keyword.
"""
from . import method  # noqa: F401  (registers ``pass``)
