"""Test support: real servers and fakes on 127.0.0.1."""
