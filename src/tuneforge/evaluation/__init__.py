"""Evaluation: metric math (loss, accuracy, BLEU, chrF, ROUGE), text scoring and training monitors.

Generation-based evaluation of a model and HTML reports live elsewhere; nothing here imports torch.
"""
