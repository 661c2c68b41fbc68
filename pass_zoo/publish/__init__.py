"""A finished run folder to the world: model card, Hugging Face Hub upload, the zoo of recipes."""
