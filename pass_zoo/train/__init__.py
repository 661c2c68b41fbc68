"""Training loops' shared machinery: the accelerate step, fine-tuning, checkpoints, relaunching."""
