"""Pure pre/post-processing functions: tokenizer, image processor, flow patching and tiling, video inputs."""
