"""Stage 8, the run: its record (RunRecorder, the RoundObserver fedhf uses), run.json's one store and schema,
checkpoints and resume, the console and the log.
"""
