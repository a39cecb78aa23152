"""The models: base-model resolution, the tiny model, CLIP, the personalized model (LoRA + learned tokens), speed options, a run's weights, the shared denoising loop."""
