"""Categories: labels, categorisers saved in the catalogue, and applying them."""
