"""The kernel tier: tests that need kernel features this machine may lack (see conftest.py)."""
