"""Dialogue side of RLPA: profiles, chat parsing, personas, simulated users, judges and the LLM client."""
