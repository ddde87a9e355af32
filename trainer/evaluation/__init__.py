"""Evaluation: win rate between two versions with a judge, and blind eval pairs for people."""
