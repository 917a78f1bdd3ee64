"""The kinds of fine-tuning task fedtune runs; a dependency-free module so that training code imports it cheaply.

- ``classification``: a text and its label; a classifier head is trained (cross-entropy).
- ``causal_lm``: a prompt and its response (instruction tuning); the loss is on the response's tokens only.
- ``plain_text``: a document (a note, a report); a causal LM continues pretraining on it, with the next-token
  loss over every token of the document. The document is the record: DP-SGD protects each document.
"""

from typing import Literal

Task = Literal["classification", "causal_lm", "plain_text"]
