"""How the same ServerApp/ClientApp pair runs: in-process, on Ray, or deployed (later)."""
