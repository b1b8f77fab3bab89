"""Offline training: scripted teacher dialogues, supervised fine-tuning (warm start) and DPO."""
