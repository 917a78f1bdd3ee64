"""The two kinds of fine-tuning task fedtune runs; a dependency-free module so that training code imports it cheaply."""

from typing import Literal

Task = Literal["classification", "causal_lm"]
