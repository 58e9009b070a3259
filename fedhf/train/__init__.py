"""Stage 4, local training: the training loop (plain PyTorch; the task says what a batch holds and what the
loss reads).
"""
