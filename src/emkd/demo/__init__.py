"""Demonstrations built on the public library; nothing in the library imports them."""
