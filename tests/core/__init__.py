"""Tests of the sans-IO core, through its modules' functions."""
