"""The pipeline's steps in their order: prepare, train, sample, score, study export, study analyze. A step imports only the foundations, the models, the method and earlier steps."""
