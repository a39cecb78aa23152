"""The training methods palp offers (``--method``) and what each one's step needs.

A plain table, read by the settings (which values ``--method`` takes), by the step's inputs
(which text states to encode) and by the training step (which guidance branches to run); the
math of each method is ``palp.method.guidance``. docs/method.md describes each method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What is personalized (``--personalize``): the weights the step trains on top of the frozen base.
# lora-token: LoRA on the UNet's attention projections + one learned token per placeholder (the paper's);
# custom-diffusion: Custom Diffusion (Kumari et al. 2023): the cross-attention layers' key and
# value projections (full weights) + the learned token;
# p-plus: P+ (Voynov et al. 2023): one learned token embedding per cross-attention layer, UNet frozen;
# neti: NeTI (Alaluf et al. 2023): a mapper from (timestep, layer) to the token's embedding, UNet frozen.
PERSONALIZATIONS = ("lora-token", "custom-diffusion", "p-plus", "neti")
LAYERED = ("p-plus", "neti")  # per-layer tokens on the frozen UNet (palp.models.layered)
DEFAULT_PERSONALIZATION = "lora-token"


@dataclass(frozen=True)
class Default:
    """A setting's default for one method, and where the value comes from."""

    value: object
    source: str


@dataclass(frozen=True)
class Method:
    """What a method's step needs beyond Eq. 1 (the personalization loss every method has)."""

    name: str
    aligns: bool  # an alignment term toward the clean prompt y_c (score sampling)
    personalized: bool  # its delta needs the personalized model on y_P (PALP's Eq. 6)
    negative: bool  # its delta needs the pretrained model on a negative prompt (NFSD)
    # The personalization the method implies (None: any, chosen by --personalize)
    personalize: str | None = None
    # TrainConfig settings whose default differs for this method, with their sources
    defaults: dict[str, Default] = field(default_factory=dict)

    @property
    def reads_target_prompt(self) -> bool:
        """Whether training depends on the target prompt (through y_c): one TI+DB run serves every prompt."""
        return self.aligns


METHOD_TABLE = {m.name: m for m in (
    Method("palp", aligns=True, personalized=True, negative=False),
    Method("ti-db", aligns=False, personalized=False, negative=False),
    Method("sds", aligns=True, personalized=False, negative=False),
    Method("nfsd", aligns=True, personalized=False, negative=True),
    # Custom Diffusion alone: Eq. 1 (with its prior preservation), no alignment term, like ti-db.
    Method("custom-diffusion", aligns=False, personalized=False, negative=False, personalize="custom-diffusion",
           defaults={
               "steps": Default(250, "Custom Diffusion's single-concept fine-tuning (Kumari et al. 2023) and the "
                                     "diffusers example's --max_train_steps"),
               "batch_size": Default(2, "the diffusers example's --train_batch_size (per device, one device)"),
               "prior_preservation": Default(True, "Custom Diffusion regularises with generated class images"),
               "num_class_images": Default(200, "Custom Diffusion's 200 regularisation images (the diffusers "
                                                "example's --num_class_images)"),
               "prior_weight": Default(1.0, "the diffusers example's --prior_loss_weight"),
           }),
    # P+ alone (Extended Textual Inversion): Eq. 1 on its per-layer tokens, no alignment term.
    Method("p-plus", aligns=False, personalized=False, negative=False, personalize="p-plus",
           defaults={
               "steps": Default(500, "P+ (Voynov et al. 2023), Sec. 5: Extended Textual Inversion converges in 500 "
                                     "steps, a tenth of Textual Inversion's 5000"),
               "batch_size": Default(8, "P+ (Voynov et al. 2023), Sec. 5: batch size 8, as Textual Inversion"),
           }),
    # NeTI alone: Eq. 1 on its mapper, no alignment term.
    Method("neti", aligns=False, personalized=False, negative=False, personalize="neti",
           defaults={
               "steps": Default(1000, "NeTI's code (NeuralTextualInversion/NeTI), input_configs/train.yaml: "
                                      "max_train_steps 1000"),
               "batch_size": Default(8, "NeTI's code: train_batch_size 2 x gradient_accumulation_steps 4"),
           }),
)}

# Defaults that follow from the personalization, whatever the method (a method's own defaults come first).
PERSONALIZATION_DEFAULTS = {
    "custom-diffusion": {
        "lr": Default(1e-5, "the diffusers example's --learning_rate, taken as given: palp's --lr is the AdamW "
                            "rate itself, not scaled by the batch size (the example's --scale_lr would multiply it "
                            "by the batch, 2 x 1e-5 at its batch of 2)"),
        "scale_augmentation": Default(True, "Custom Diffusion (Kumari et al. 2023), its training details: images rescaled "
                                            "at random with 'very small'/'zoomed in' phrases, the loss on the image's region; the "
                                            "diffusers example's CustomDiffusionDataset(aug=True), its default"),
        "token_init": Default("rare", "Custom Diffusion (Kumari et al. 2023): the modifier token V* is initialised with a "
                                      "rarely occurring token embedding; its code copies CLIP's vocabulary entries 42170, "
                                      "47629, 43514 (ktn, pll, ucd</w>), one per modifier token (the diffusers example's "
                                      "--initializer_token ktn+pll+ucd)"),
    },
    "p-plus": {
        "lr": Default(5e-3, "P+ (Voynov et al. 2023), Sec. 5: learning rate 5e-3, as Textual Inversion"),
    },
    "neti": {
        "hflip": Default(0.5, "NeTI's code (training/dataset.py): each image is mirrored left-right with probability 0.5 "
                              "(its TextualInversionDataset's flip_p)"),
        "prompt_templates": Default("textual-inversion", "NeTI's code (training/dataset.py): each image's prompt is one "
                                                         "of Textual Inversion's object templates, drawn at random"),
        "lr": Default(8e-3, "NeTI's code: learning_rate 1e-3 scaled (scale_lr) by its batch of 2 and 4 accumulation "
                            "steps, 8e-3 on one device; palp's --lr is the rate itself"),
    },
}

METHODS = tuple(METHOD_TABLE)

# NFSD's negative prompt for the "denoising" direction at large t (Katzir et al., Sec. 4).
NFSD_NEGATIVE_PROMPT = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
