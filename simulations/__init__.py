"""Ready-to-run study configs, installed with fedmed so `fedmed simulate NAME` finds them."""
