"""What a metatoken is and the math: specs, prompts, data, losses, models, the cached-prompt teacher.
Never imports a stage."""
