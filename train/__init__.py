"""Training Medusa heads: chat data (`train.data`), self-distillation (`train.distill`) and the stage-1 loop."""
