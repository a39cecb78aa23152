"""World v2 of the toy world (issue 30, item 3): a base model that knows named instances
across styles, as Stable Diffusion does.

- ``palp.toyworld.v2.render``: v1's scenes with the subject larger and its identity coarse
  enough (features of at least 2 latent pixels) to be read in every style and through the VAE;
- ``palp.toyworld.v2.world``: 300 named instances, each bound to one composite identity and
  pretrained in every style, place and time; composites held out by rule (never in pretraining)
  for the personal subjects; the pretraining set's plan; the judge's v2 accuracy.

Its models are trained by ``evaluation/toyworld/pretrain.py all --world v2`` (see
evaluation/toyworld/README.md, "World v2 (in training)"). v1 (``palp.toyworld``) is unchanged
and is still what palp uses.
"""

WORLD = "v2"
