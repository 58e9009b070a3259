"""Stage 3, model and task: where a model comes from, LoRA, the adapter state that travels, and the task seam
(fedhf.tasks.base.Task; today text classification) that owns the model class, batches, loss, metrics and
prediction.
"""
