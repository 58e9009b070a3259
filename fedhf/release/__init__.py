"""Stage 9, release: the model card and provenance (the Hub-ready folder), and the push to the Hub."""
