"""Training: a run (settings, epochs, evaluation), its start and resume with locks, the
options declared once, and learning-rate schedules."""
