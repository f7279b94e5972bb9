"""How the server runs: settings, the process plan, CPUs, the run folder, drain, the server seam."""
