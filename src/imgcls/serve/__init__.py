"""HTTP prediction server over a Predictor: JSON API plus a small self-contained upload page."""
